"""Houlsby and Pfeiffer bottleneck adapters: placement, step-zero identity, options, IO round trip and unload."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import VOCAB, make_bert, make_gpt2, make_llama, make_plain
from peft_oracle import logits
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.export import export_merged, merged_state_dict
from lightning_lora.io import load_adapter, save_adapter
from lightning_lora.methods.base import MergeError
from lightning_lora.methods.bottleneck import BottleneckAdapter, from_adapterhub
from lightning_lora.surgery import (
    adapter_state_dict,
    adapters,
    disable_adapters,
    inject,
    merge,
    unload,
    unmerge,
)


def token_batch() -> Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def perturb_up(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give every adapter_up random weights so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters(model).values():
            adapter.adapter_up.weight.copy_(torch.randn(adapter.adapter_up.weight.shape, generator=gen) * scale)
            adapter.adapter_up.bias.copy_(torch.randn(adapter.adapter_up.bias.shape, generator=gen) * scale)


PLACEMENT = [
    ("llama", make_llama, "houlsby", [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn", "mlp")]),
    ("llama", make_llama, "pfeiffer", [f"model.layers.{i}" for i in (0, 1)]),
    ("gpt2", make_gpt2, "houlsby", [f"transformer.h.{i}.{p}" for i in (0, 1) for p in ("attn", "mlp")]),
    ("gpt2", make_gpt2, "pfeiffer", [f"transformer.h.{i}" for i in (0, 1)]),
    ("bert", make_bert, "houlsby",
     [f"bert.encoder.layer.{i}.{p}" for i in (0, 1) for p in ("attention.output", "output")]),
    ("bert", make_bert, "pfeiffer", [f"bert.encoder.layer.{i}.output" for i in (0, 1)]),
]


@pytest.mark.parametrize("family,make,method,expected", PLACEMENT, ids=[f"{p[0]}-{p[2]}" for p in PLACEMENT])
def test_default_placement(family: str, make: Callable[[], nn.Module], method: str, expected: list[str]) -> None:
    model = make()
    paths = inject(model, AdapterConfig.create(method))
    assert paths == expected
    assert sorted(adapters(model)) == sorted(expected)
    for path in expected:
        assert isinstance(model.get_submodule(path).bottleneck_adapter, BottleneckAdapter)


def _reference_module() -> ModuleType:
    """tests/reference/make_bottleneck_reference.py, for its FixedMaskDropout (loaded by path: tests is no package)."""
    path = REFERENCE / "make_bottleneck_reference.py"
    spec = importlib.util.spec_from_file_location("make_bottleneck_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = Path(__file__).parent.parent / "reference"
ORACLE = [(family, method) for family in ("bert", "gpt2", "llama") for method in ("houlsby", "pfeiffer")]


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, Tensor], dict, ModuleType]:
    tensors = load_file(str(REFERENCE / "bottleneck_reference.safetensors"))
    meta = json.loads((REFERENCE / "bottleneck_reference.json").read_text(encoding="utf-8"))
    return tensors, meta, _reference_module()


@pytest.mark.parametrize("family,method", ORACLE, ids=[f"{f}-{m}" for f, m in ORACLE])
def test_equals_adapterhub(reference: tuple[dict[str, Tensor], dict, ModuleType], family: str, method: str) -> None:
    """AdapterHub adapters 1.3 as the oracle: outputs it computed with the same base and adapter weights, in eval mode
    and in train mode with the same hidden-dropout masks (tests/reference/make_bottleneck_reference.py)."""
    import transformers

    tensors, meta, ref = reference
    spec = meta["models"][family]
    model = getattr(transformers, spec["model_class"])(getattr(transformers, spec["config_class"])(**spec["config"]))
    base = f"{family}/base/"
    model.load_state_dict({k[len(base):]: v for k, v in tensors.items() if k.startswith(base) and k.count("/") == 2})
    assert ref.fix_dropout_masks(model) == spec["dropout_paths"]  # the masks AdapterHub's model saw

    def check(name: str) -> None:
        for mode in ("eval", "train"):
            model.train(mode == "train")
            with torch.no_grad():
                out = model(input_ids=tensors["tokens"], output_hidden_states=True)
            expected = tensors[f"{family}/{name}/{mode}/last_hidden"]
            torch.testing.assert_close(out.hidden_states[-1], expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.logits, tensors[f"{family}/{name}/{mode}/logits"], rtol=0, atol=1e-5)
            if name != "base":  # the adapters matter
                assert (expected - tensors[f"{family}/base/{mode}/last_hidden"]).abs().max() > 0.1

    check("base")  # transformers 5 computes what 4.57 did without adapters
    options = meta["methods"][method]
    inject(model, AdapterConfig.create(method, reduction_factor=meta["reduction_factor"],
                                       nonlinearity=options["non_linearity"]))
    prefix = f"{family}/{method}/adapter/"
    ours = from_adapterhub(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, method)
    assert ours.keys() == adapter_state_dict(model).keys()
    model.load_state_dict(ours, strict=False)
    check(method)


def test_from_adapterhub_names_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="transformer.h.0.attn.c_proj.weight is not an AdapterHub bottleneck"):
        from_adapterhub(make_gpt2(), {"transformer.h.0.attn.c_proj.weight": torch.zeros(1)}, "houlsby")
    with pytest.raises(ConfigError, match="PlainNet is not a model family"):
        from_adapterhub(make_plain(), {}, "houlsby")


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("make", [make_llama, make_gpt2, make_bert], ids=["llama", "gpt2", "bert"])
def test_step_zero_is_the_base_model_and_up_changes_it(make: Callable[[], nn.Module], method: str) -> None:
    base = make()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig.create(method, reduction_factor=4))
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)
        perturb_up(model)
        assert (logits(model, x) - logits(base, x)).abs().max() > 1e-4


def test_adapter_follows_the_sublayer_output() -> None:
    """h + up(act(down(h))) applied to the named sublayer's output, the rest of the model unchanged."""
    base = make_plain()
    model = copy.deepcopy(base)
    assert inject(model, AdapterConfig.create("houlsby", target_modules=["block.2"], reduction_factor=4,
                                              nonlinearity="tanh")) == ["block.2"]
    perturb_up(model)
    adapter = model.block[2].bottleneck_adapter
    assert adapter.adapter_down.out_features == 4 and adapter.adapter_up.out_features == 16
    x = token_batch()
    with torch.no_grad():
        h = base.embed(x)
        h = h + base.conv(h.transpose(1, 2)).transpose(1, 2)
        sub = base.block[2](base.block[1](base.block[0](h)))
        sub = sub + adapter.adapter_up(torch.tanh(adapter.adapter_down(sub)))
        expected = base.head((h + sub).mean(1))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_options_change_the_module() -> None:
    shapes = {}
    for factor in (4, 16):
        model = make_llama()
        inject(model, AdapterConfig.create("pfeiffer", reduction_factor=factor))
        shapes[factor] = model.model.layers[0].bottleneck_adapter.adapter_down.weight.shape
    assert shapes == {4: (8, 32), 16: (2, 32)}

    outputs = {}
    for nonlinearity, cls in (("relu", nn.ReLU), ("gelu", nn.GELU), ("tanh", nn.Tanh), ("silu", nn.SiLU)):
        model = make_llama()
        inject(model, AdapterConfig.create("pfeiffer", reduction_factor=4, nonlinearity=nonlinearity))
        assert all(type(a.activation) is cls for a in adapters(model).values())
        torch.manual_seed(0)
        with torch.no_grad():  # same weights in every model, only the activation differs
            for adapter in adapters(model).values():
                adapter.adapter_down.weight.normal_(std=1.0)
        perturb_up(model)
        with torch.no_grad():
            outputs[nonlinearity] = logits(model, token_batch())
    assert not torch.allclose(outputs["relu"], outputs["gelu"], atol=1e-4)
    assert not torch.allclose(outputs["relu"], outputs["tanh"], atol=1e-4)


def test_plain_module_needs_target_modules() -> None:
    model = make_plain()
    with pytest.raises(ConfigError, match="Could not locate sublayers for 'houlsby' in PlainNet"):
        inject(model, AdapterConfig.create("houlsby"))
    with pytest.raises(ConfigError, match=r"cannot adapt: block\.1 \(ReLU\)"):
        inject(model, AdapterConfig.create("houlsby", target_modules=["block.1"]))
    assert not adapters(model)


def test_only_adapter_parameters_train() -> None:
    model = make_gpt2()
    inject(model, AdapterConfig.create("houlsby"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck_adapter.adapter_" in n for n in trainable)
    assert len(trainable) == 4 * 4  # 4 adapters x (down, up) x (weight, bias)


def test_merge_and_merged_export_refer_to_save_adapter(tmp_path: Path) -> None:
    model = make_llama()
    inject(model, AdapterConfig.create("houlsby"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for action in (merge, unmerge, lambda m: unload(m, merge=True)):
        with pytest.raises(MergeError, match=r"'houlsby' adapters are inserted modules.*save_adapter"):
            action(model)
    for action in (merged_state_dict, lambda m: export_merged(m, tmp_path / "merged")):
        with pytest.raises(MergeError, match=r"cannot be merged.*save_adapter"):
            action(model)
    assert not (tmp_path / "merged").exists()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert len(adapters(model)) == 4


@pytest.mark.parametrize("make,method", [(make_llama, "houlsby"), (make_gpt2, "pfeiffer"), (make_bert, "houlsby"),
                                         (make_bert, "pfeiffer")],
                         ids=["llama-houlsby", "gpt2-pfeiffer", "bert-houlsby", "bert-pfeiffer"])
def test_save_load_round_trip_on_a_fresh_base(tmp_path: Path, make: Callable[[], nn.Module], method: str) -> None:
    model = make()
    inject(model, AdapterConfig.create(method, reduction_factor=8, nonlinearity="gelu"))
    perturb_up(model, seed=3)
    save_adapter(model, tmp_path / "adapter")
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert data["method"] == method and data["nonlinearity"] == "gelu" and data["reduction_factor"] == 8

    fresh = make()
    assert sorted(load_adapter(fresh, tmp_path / "adapter")) == sorted(adapters(model))
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh, x), logits(model, x), rtol=0, atol=0)
    saved, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert all(p.requires_grad == (".bottleneck_adapter." in n) for n, p in fresh.named_parameters())


def test_plain_module_round_trip(tmp_path: Path) -> None:
    model = make_plain()
    inject(model, AdapterConfig.create("pfeiffer", target_modules=["block.0", "head"], reduction_factor=2))
    perturb_up(model, seed=4)
    save_adapter(model, tmp_path / "a")
    fresh = make_plain()
    load_adapter(fresh, tmp_path / "a")
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_disable_adapters_gives_the_base_output() -> None:
    base = make_gpt2()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig.create("houlsby"))
    perturb_up(model)
    x = token_batch()
    with torch.no_grad():
        adapted = logits(model, x)
        with disable_adapters(model):
            torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)
        torch.testing.assert_close(logits(model, x), adapted, rtol=0, atol=0)


def test_unload_removes_adapters_and_hooks() -> None:
    base = make_llama()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig.create("houlsby"))
    perturb_up(model)
    hooked = [m for m in model.modules() if m._forward_hooks]
    assert len(hooked) == 4
    assert unload(model) is model
    assert not adapters(model)
    assert not any(name.endswith("bottleneck_adapter") for name, _ in model.named_modules())
    assert all(not m._forward_hooks for m in hooked)
    assert model.state_dict().keys() == base.state_dict().keys()
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)
    inject(model, AdapterConfig.create("pfeiffer"))  # a fresh injection works after unload
    assert len(adapters(model)) == 2


def test_inject_twice_is_refused() -> None:
    model = make_gpt2()
    inject(model, AdapterConfig.create("houlsby"))
    with pytest.raises(ConfigError, match="already has 'houlsby' adapters; call unload"):
        inject(model, AdapterConfig.create("pfeiffer"))
    assert len(adapters(model)) == 4


def test_adapter_computes_in_its_own_dtype() -> None:
    """A bfloat16 sublayer output goes through the float32 adapter and comes back as bfloat16."""
    model = make_plain()
    inject(model, AdapterConfig.create("houlsby", target_modules=["head"]))
    adapter = model.head.bottleneck_adapter
    h = torch.randn(3, 4).to(torch.bfloat16)
    out = adapter(h)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, h, rtol=0, atol=0)  # up is zero


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
def test_gradients_with_gradient_checkpointing(method: str) -> None:
    """Houlsby's hooks run inside a decoder layer, Pfeiffer's on its output, around the unit transformers recomputes
    under activation checkpointing: the adapter gradients must be the same with it on."""
    grads, calls = [], []
    for checkpointing in (False, True):
        model = make_llama()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        inject(model, AdapterConfig.create(method, reduction_factor=4), seed=0)
        perturb_up(model)
        calls.append(0)  # calls of the block's attention: a second one when the backward recomputes it
        model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        model.train()
        model(input_ids=token_batch(), labels=token_batch()).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys() and all(g.abs().max() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
def test_recorded_hidden_states_include_the_adapter(method: str) -> None:
    """transformers records hidden states with forward hooks it adds on the first forward; ours run first, so a model
    that ran before injection reports the same hidden states as one that did not."""
    states = []
    for ran_before in (False, True):
        model = make_llama()
        if ran_before:
            with torch.no_grad():
                model(input_ids=token_batch(), output_hidden_states=True)
        inject(model, AdapterConfig.create(method, reduction_factor=4), seed=0)
        perturb_up(model)
        with torch.no_grad():
            states.append(model(input_ids=token_batch(), output_hidden_states=True).hidden_states)
    for ours, reference in zip(states[1], states[0]):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
