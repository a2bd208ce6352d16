"""PiSSA and OLoRA inits (methods/lora_init.py) against PEFT: same A0, B0 and residual; exports that are a plain LoRA
of rank 2r on the original base (PEFT loads them with equal outputs); merge, unload, fit and resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_gpt2, make_llama, make_plain
from peft_oracle import PEFT_WARNINGS, logits
from pytorch_lightning.callbacks import ModelCheckpoint
from tiny_modules import TinyLlamaModule, TokensDataModule, trainer
from torch import nn

import lightning_lora as ll
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.fingerprint import base_fingerprint
from lightning_lora.io import load_adapter, save_adapter
from lightning_lora.methods.lora_init import ResidualLoRAUpdate
from lightning_lora.surgery import adapters, inject, merge, unload, unmerge

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def tokens() -> torch.Tensor:
    return torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def adapted(base: nn.Module, init: str, targets: list[str], **options) -> nn.Module:
    model = copy.deepcopy(base)
    inject(model, AdapterConfig.create("lora", r=4, alpha=8.0, target_modules=targets, init_weights=init, **options),
           seed=3)
    return model


def train_a_little(model: nn.Module) -> None:
    """Move A and B away from their init, as training would."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in adapters(model).values():
            update = layer.adapters["default"]
            for p in (update.lora_A.weight, update.lora_B.weight):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("make,targets,init", [(make_llama, LLAMA_TARGETS, "pissa"), (make_llama, LLAMA_TARGETS, "olora"),
                                               (make_gpt2, ["c_attn", "c_fc"], "pissa")],
                         ids=["llama-pissa", "llama-olora", "gpt2-conv1d-pissa"])
def test_init_equals_peft_and_starts_as_the_base(make, targets: list[str], init: str) -> None:
    """PEFT's pissa_init/olora_init on the same base give the same A, B and residual weight (PEFT's OLoRA does not
    transpose Conv1D weights, so GPT-2 is checked with PiSSA only)."""
    import peft

    base = make()
    ours = adapted(base, init, targets)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                    init_lora_weights=init))
    inner = theirs.base_model.model
    for path, layer in adapters(ours).items():
        update, peft_layer = layer.adapters["default"], inner.get_submodule(path)
        torch.testing.assert_close(update.lora_A.weight, peft_layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(update.lora_B.weight, peft_layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight, rtol=1e-5, atol=1e-6)
        assert (layer.weight - base.get_submodule(path).weight).abs().max() > 1e-2  # the base really changed
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, tokens()), logits(base, tokens()), rtol=1e-5, atol=1e-5)
    assert base_fingerprint(ours) == base_fingerprint(base)  # files and checkpoints belong to the original base


def test_fast_svd_init_takes_the_principal_part() -> None:
    """pissa_niter_<n>: a randomized SVD; on a weight with a clear rank-4 part its A0, B0 give nearly the exact
    update, and the model still starts as its base."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 24))
    with torch.no_grad():
        base[0].weight.copy_(torch.randn(24, 4, generator=gen) @ torch.randn(4, 32, generator=gen)
                             + 0.01 * torch.randn(24, 32, generator=gen))
    exact, fast = adapted(base, "pissa", ["0"]), adapted(base, "pissa_niter_2", ["0"])
    a, b = exact[0].adapters["default"], fast[0].adapters["default"]
    delta_exact, delta_fast = a.lora_B.weight @ a.lora_A.weight, b.lora_B.weight @ b.lora_A.weight
    assert (delta_fast - delta_exact).norm() < 1e-3 * delta_exact.norm()
    x = torch.randn(5, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), base(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,targets,init,rslora", [(make_llama, LLAMA_TARGETS, "pissa", False),
                                                      (make_llama, LLAMA_TARGETS, "olora", True),
                                                      (make_gpt2, ["c_attn", "c_proj"], "olora", False)],
                         ids=["llama-pissa", "llama-olora-rslora", "gpt2-conv1d-olora"])
def test_export_is_plain_lora_on_the_original_base(tmp_path: Path, make, targets: list[str], init: str,
                                                   rslora: bool) -> None:
    """The file holds [A; A0] and [B | -B0] (rank 2r, alpha scaled to keep the scaling): PEFT and we load it on the
    original base with the trained model's outputs."""
    import peft

    base = make()
    ours = adapted(base, init, targets, use_rslora=rslora)
    train_a_little(ours)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    assert config["lora_alpha"] == pytest.approx(8.0 * (2 ** 0.5 if rslora else 2))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "adapter")  # the fingerprint check passes: it is the original base's
    with torch.no_grad():
        expected, base_out = logits(ours, tokens()), logits(base, tokens())
        torch.testing.assert_close(logits(theirs, tokens()), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(reloaded, tokens()), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base_out).abs().max() > 1e-2


def test_merge_unmerge_and_unload_give_the_expected_weights() -> None:
    base = make_gpt2()
    model = adapted(base, "pissa", ["c_attn"])
    train_a_little(model)
    layers = adapters(model)
    residual = {p: layer.weight.detach().clone() for p, layer in layers.items()}
    file_delta = {p: layer.linear_weight().new_tensor(0) for p, layer in layers.items()}
    for path, layer in layers.items():  # the update a file holds, against the original base ((in, out) for Conv1D)
        update = layer.adapters["default"]
        tensors = update.file_tensors()
        file_delta[path] = (tensors["lora_B.weight"] @ tensors["lora_A.weight"] * update.scaling).T
    merge(model)
    for path, layer in layers.items():  # merged = original base + the trained update
        torch.testing.assert_close(layer.weight, base.get_submodule(path).weight + file_delta[path], rtol=0, atol=1e-6)
    unmerge(model)
    for path, layer in layers.items():
        torch.testing.assert_close(layer.weight, residual[path], rtol=0, atol=1e-7)
    unload(model)
    for name, param in base.named_parameters():  # unload without merging: the user's original weights
        torch.testing.assert_close(model.get_parameter(name), param, rtol=0, atol=1e-6)
    assert not adapters(model)


def test_loading_other_init_values_rebases_the_residual() -> None:
    """A checkpoint's A0/B0 (say, from a decomposition that rounded differently) become the residual's: W_res = W -
    s B0 A0 with the loaded values, so the model still starts from the original base."""
    base = make_llama()
    model = adapted(base, "pissa", ["q_proj"])
    state = {k: v.clone() for k, v in ll.adapter_state_dict(model).items()}
    for key in [k for k in state if k.endswith("_init")]:
        state[key] += 1e-3 * torch.randn_like(state[key])
    model.load_state_dict(state, strict=False)
    for path, layer in adapters(model).items():
        update = layer.adapters["default"]
        torch.testing.assert_close(layer.weight + update.init_delta(), base.get_submodule(path).weight, rtol=0,
                                   atol=1e-6)


def test_invalid_options_are_refused_before_the_model_changes() -> None:
    with pytest.raises(ConfigError, match="pissa_niter_<n>"):
        AdapterConfig.create("lora", init_weights="pissa_niter_0")
    with pytest.raises(ConfigError, match="method='lora'"):
        AdapterConfig.create("dora", init_weights="olora")
    model, before = make_plain(), make_plain().state_dict()
    with pytest.raises(ConfigError, match="embed is a Embedding"):
        inject(model, AdapterConfig.create("lora", r=2, target_modules=["embed", "0"], init_weights="pissa"))
    assert not adapters(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_peft_config_with_pissa_starts_a_new_adapter() -> None:
    import peft

    model = make_llama()
    inject(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_2"))
    assert all(isinstance(layer.adapters["default"], ResidualLoRAUpdate) for layer in adapters(model).values())


def test_fit_resume_and_merged_export(tmp_path: Path) -> None:
    """A PiSSA run lowers the loss; resuming rebuilds the same residual base and adapter; the merged export is the
    original base plus the trained update (what PEFT computes from the exported adapter on the original base)."""
    import peft
    from transformers import LlamaForCausalLM

    def callback(name: str) -> ll.LoRACallback:
        return ll.LoRACallback(r=4, target_modules=["q_proj", "v_proj"], init_weights="pissa",
                               export_dir=str(tmp_path / name / "export"))

    pl.seed_everything(0)
    straight = TinyLlamaModule()
    done = callback("a")
    trainer(tmp_path / "a", [done], max_epochs=2).fit(straight, TokensDataModule())
    assert sum(straight.losses[-4:]) < sum(straight.losses[:4])

    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", [callback("b"), checkpoint], max_epochs=1).fit(TinyLlamaModule(), TokensDataModule())
    resumed = TinyLlamaModule()
    trainer(tmp_path / "b", [callback("b")], max_epochs=2).fit(resumed, TokensDataModule(),
                                                               ckpt_path=checkpoint.last_model_path)
    expected, actual = ll.adapter_state_dict(straight.model), ll.adapter_state_dict(resumed.model)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    for path, layer in adapters(straight.model).items():
        assert torch.equal(adapters(resumed.model)[path].weight, layer.weight)  # the same residual base

    original = TinyLlamaModule().model.eval()
    merged = LlamaForCausalLM.from_pretrained(done.merged_dir).eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), done.adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, tokens()), logits(theirs, tokens()), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits(straight.model.eval(), tokens()), logits(theirs, tokens()), rtol=1e-4,
                                   atol=1e-5)


def test_second_adapter_and_delete_keep_the_residual_right() -> None:
    """Adding another named adapter (which swaps the original modules in for targeting) leaves the residual base as
    it is; deleting the PiSSA adapter gives the base its principal part back."""
    base = make_llama()
    model = adapted(base, "pissa", ["q_proj"])
    train_a_little(model)
    with torch.no_grad():
        expected = logits(model, tokens())
    inject(model, AdapterConfig.create("lora", r=2, target_modules=["q_proj"]), seed=1, name="other")
    with torch.no_grad():
        torch.testing.assert_close(logits(model, tokens()), expected, rtol=1e-6, atol=1e-6)
    ll.delete_adapter(model, "default")
    for path, layer in adapters(model).items():
        torch.testing.assert_close(layer.weight, base.get_submodule(path).weight, rtol=0, atol=1e-6)


def test_quantized_residual_keeps_the_original_fingerprint() -> None:
    """QPiSSA: the residual is what gets quantized; the base fingerprint stays the original full-precision one."""
    base = make_llama()
    model = adapted(base, "pissa", ["q_proj"])
    ll.quantize_base(model, {"format": "nf4", "scaler_block_size": 16})
    assert base_fingerprint(model) == base_fingerprint(base)


def test_cli_parses_the_init(tmp_path: Path) -> None:
    from lightning_lora.cli import build_cli

    cli = build_cli(["fit", "--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", "--lora.r=2",
                     "--lora.init_weights=pissa", "--lora.target_modules=[q_proj]"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]
    assert callback.config.init_weights == "pissa"
    assert all(isinstance(a.adapters["default"], ResidualLoRAUpdate) for a in adapters(cli.model.model).values())


def test_quantized_merge_into_the_original_weights() -> None:
    """QPiSSA merged into the user's full-precision original weights: original + the trained update (not + s B A,
    which is the update against the residual)."""
    from lightning_lora.quantize import merged_quantized_state_dict

    base = make_llama()
    model = adapted(base, "pissa", ["q_proj"])
    train_a_little(model)
    expected = {}
    for path, layer in adapters(model).items():
        tensors = layer.adapters["default"].file_tensors()
        expected[f"{path}.weight"] = (base.get_submodule(path).weight
                                      + tensors["lora_B.weight"] @ tensors["lora_A.weight"] * 2.0)
    ll.quantize_base(model, {"format": "nf4", "scaler_block_size": 16})
    merged, _ = merged_quantized_state_dict(model, "original", original=base.state_dict(), report=None)
    for key, weight in expected.items():
        torch.testing.assert_close(merged[key], weight, rtol=0, atol=1e-6)


def test_unloading_a_quantized_residual_warns() -> None:
    model = adapted(make_llama(), "pissa", ["q_proj"])
    ll.quantize_base(model, {"format": "nf4", "scaler_block_size": 16})
    with pytest.warns(UserWarning, match="keeps its quantized PiSSA/OLoRA residual"):
        unload(model)
    assert not adapters(model)
