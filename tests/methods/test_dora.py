"""DoRA against PEFT as the oracle: same A, B and magnitude give the same outputs and gradients."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from conftest import VOCAB, make_bert, make_gpt2, make_llama
from peft_oracle import PEFT_WARNINGS, adapter_grads, logits, ours_to_peft, peft_model, randomize_adapters, square_loss
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.config import AdapterConfig, ConfigError, LoRAConfig
from lightning_lora.surgery import inject
from lightning_lora.methods.base import AdaptedLayer
from lightning_lora.methods.dora import DoRAConvUpdate, DoRAUpdate
from lightning_lora.surgery import adapters


pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]


def token_batch() -> Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


CASES: list[tuple[str, Callable[[], nn.Module], dict[str, Any]]] = [
    ("llama-linear", make_llama, {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "alpha": 8.0}),
    ("gpt2-conv1d-bias", make_gpt2, {"target_modules": ["c_attn", "c_fc"], "r": 4, "alpha": 4.0}),
    ("bert-linear-bias", make_bert, {"target_modules": ["query", "value", "output.dense"], "r": 2, "alpha": 4.0}),
    ("rslora-patterns", make_llama, {"target_modules": ["k_proj", "up_proj"], "r": 4, "alpha": 8.0,
                                     "use_rslora": True, "rank_pattern": {"up_proj": 2}}),
]
IDS = [c[0] for c in CASES]
PARAMS = [c[1:] for c in CASES]


def peft_options(options: dict[str, Any]) -> dict[str, Any]:
    """Our DoRA options in ``peft.LoraConfig``'s names."""
    renamed = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    return {"use_dora": True, **{renamed.get(k, k): v for k, v in options.items()}}


def build_pair(make: Callable[[], nn.Module], options: dict[str, Any]) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, ours, PEFT's): our random A, B and magnitude copied into PEFT's DoRA layers."""
    base = make()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("dora", **options))
    randomize_adapters(ours, seed=11)
    theirs = peft_model(base, **peft_options(options))
    ours_to_peft(ours, theirs)
    return base, ours, theirs


def outputs(model: nn.Module, x: Tensor) -> Tensor:
    """Logits and last hidden state together (BERT's classifier logits alone are too small to compare)."""
    out = model(x, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


@pytest.mark.parametrize("make,options", PARAMS, ids=IDS)
def test_same_output_as_peft(make: Callable[[], nn.Module], options: dict[str, Any]) -> None:
    base, ours, theirs = build_pair(make, options)
    x = token_batch()
    with torch.no_grad():
        got, expected, base_out = outputs(ours, x), outputs(theirs, x), outputs(base, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base_out).abs().max() > 1e-2


@pytest.mark.parametrize("make,options", PARAMS, ids=IDS)
def test_same_gradients_as_peft(make: Callable[[], nn.Module], options: dict[str, Any]) -> None:
    """Magnitude, A and B gradients agree with PEFT, which treats the weight norm as a constant."""
    _, ours, theirs = build_pair(make, options)
    x = token_batch()
    square_loss(outputs(ours, x)).backward()
    square_loss(outputs(theirs, x)).backward()
    names = set()
    for key, mine, reference in adapter_grads(ours, theirs):
        names.add(key.rsplit(".", 2)[-2] if key.endswith(".weight") else key.rsplit(".", 1)[-1])
        assert mine is not None and reference is not None, key
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5, msg=key)
    assert names == {"lora_A", "lora_B", "lora_magnitude_vector"}


@pytest.mark.parametrize("make,options", PARAMS, ids=IDS)
def test_default_init_starts_as_the_base_model(make: Callable[[], nn.Module], options: dict[str, Any]) -> None:
    base = make()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("dora", **options))
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(ours, x), outputs(base, x), rtol=1e-5, atol=1e-5)


def test_magnitude_starts_as_the_column_norm_like_peft() -> None:
    """With init_weights=False (B != 0) the magnitude is ||W0 + s B A|| per output unit, as PEFT initializes it."""
    base = make_gpt2()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("dora", target_modules=["c_attn"], r=4, alpha=4.0, init_weights=False))
    theirs = peft_model(base, target_modules=["c_attn"], r=4, lora_alpha=4.0, use_dora=True)
    layer = ours.transformer.h[0].attn.c_attn.adapters["default"]
    peft_layer = theirs.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
        peft_layer.lora_magnitude_vector["default"].update_layer(
            base_layer=peft_layer.get_base_layer(), lora_A=layer.lora_A.weight, lora_B=layer.lora_B.weight,
            scaling=layer.scaling)
    expected = peft_layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,r,fan_in_fan_out", [((12, 20), 3, False), ((20, 12), 5, True), ((7, 7), 1, False)])
def test_column_norm_equals_the_full_weight_norm(shape: tuple[int, int], r: int, fan_in_fan_out: bool) -> None:
    """The factored norm ||W0||^2 + 2 s <B, W0 A^T> + s^2 B (A A^T) B^T equals the norm of the built weight."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(r)
    out_features, in_features = shape
    base = Conv1D(out_features, in_features) if fan_in_fan_out else nn.Linear(in_features, out_features)
    nn.init.normal_(base.weight)
    holder = nn.Sequential(base)
    inject(holder, AdapterConfig.create("dora", target_modules=["0"], r=r, alpha=3.0, init_weights=False))
    layer, dora = holder[0], holder[0].adapters["default"]
    w = layer.weight.T if fan_in_fan_out else layer.weight
    full = w + dora.scaling * dora.lora_B.weight @ dora.lora_A.weight
    torch.testing.assert_close(dora.column_norm(layer.linear_weight()), torch.linalg.norm(full, dim=1), rtol=1e-5,
                               atol=1e-5)


def test_weight_norm_is_detached_from_the_graph() -> None:
    """Gradients equal those of m * (W0 + s B A) x / c with c a constant, and differ from an attached norm."""
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(10, 6))
    inject(holder, AdapterConfig.create("dora", target_modules=["0"], r=3, alpha=3.0, init_weights=False))
    base, layer = holder[0], holder[0].adapters["default"]
    randomize_adapters(holder, seed=2, scale=0.5)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))
    loss_weights = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    (holder(x) * loss_weights).sum().backward()
    ours = [layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.lora_magnitude_vector.grad]

    def reference(detach: bool) -> list[Tensor]:
        a = layer.lora_A.weight.detach().clone().requires_grad_()
        b = layer.lora_B.weight.detach().clone().requires_grad_()
        m = layer.lora_magnitude_vector.detach().clone().requires_grad_()
        v = base.weight.detach() + layer.scaling * b @ a
        norm = torch.linalg.norm(v, dim=1)
        norm = norm.detach() if detach else norm
        out = x @ ((m / norm).unsqueeze(1) * v).T + base.bias.detach()
        return list(torch.autograd.grad((out * loss_weights).sum(), [a, b, m]))

    for mine, expected in zip(ours, reference(detach=True)):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-6)
    attached = reference(detach=False)
    assert not torch.allclose(ours[1], attached[1], rtol=1e-3, atol=1e-5)


def test_dropout_in_train_mode_matches_peft() -> None:
    """With dropout, PEFT rescales the dropped-out input's base projection; we do the same with the same mask."""
    options = {"target_modules": ["q_proj", "o_proj"], "r": 4, "alpha": 8.0, "dropout": 0.3}
    _, ours, theirs = build_pair(make_llama, options)
    ours.train(), theirs.train()
    x = token_batch()
    with torch.no_grad():
        torch.manual_seed(9)
        got = logits(ours, x)
        torch.manual_seed(9)
        expected = logits(theirs, x)
        ours.eval()
        eval_out = logits(ours, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - eval_out).abs().max() > 1e-4


def test_dora_layer_state_names_follow_peft() -> None:
    model = make_llama()
    inject(model, AdapterConfig.create("dora", target_modules=["q_proj"], r=2))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, AdaptedLayer) and isinstance(layer.adapters["default"], DoRAUpdate)
    assert set(layer.adapter_tensors()) == {f"adapters.default.{n}" for n in ("lora_A.weight", "lora_B.weight",
                                                                              "lora_magnitude_vector")}
    assert layer.adapters["default"].lora_magnitude_vector.shape == (32,)
    assert all(p.requires_grad for p in layer.adapter_parameters()) and not layer.weight.requires_grad
    assert len(adapters(model)) == 2


class ConvNet(nn.Module):
    """An embedding, then Conv1d/2d/3d (with and without a bias; zero padding, since PEFT's LoRA convolutions ignore
    padding_mode, which ours honor)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv1 = nn.Conv1d(6, 5, 3, padding=1, bias=False)
        self.conv3 = nn.Conv3d(5, 3, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens).transpose(1, 2)  # (B, 4, T)
        h = self.conv2(h[..., None].expand(-1, -1, -1, 3)).mean(-1)  # (B, 6, T)
        h = self.conv1(h)  # (B, 5, T)
        return self.conv3(h[..., None, None].expand(-1, -1, -1, 2, 2))


CONV_TARGETS = ["embed", "conv1", "conv2", "conv3"]


def conv_pair(peft_targets: list[str] = CONV_TARGETS) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = ConvNet().eval()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("dora", r=2, alpha=4.0, target_modules=peft_targets))
    randomize_adapters(ours, seed=3)
    theirs = peft_model(base, r=2, lora_alpha=4.0, target_modules=peft_targets, use_dora=True)
    ours_to_peft(ours, theirs)
    return base, ours, theirs


def test_conv_and_embedding_match_peft() -> None:
    """Magnitude per output channel (conv, shaped (1, out, 1, ...) as PEFT's) and per embedding dimension (norm over
    the vocabulary): the same outputs and gradients as PEFT's DoRA layers, and the model starts as its base."""
    torch.manual_seed(0)
    fresh = ConvNet().eval()
    start = copy.deepcopy(fresh)
    inject(start, AdapterConfig.create("dora", r=2, target_modules=CONV_TARGETS))
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(start(x), fresh(x), rtol=1e-5, atol=1e-6)
    assert start.conv2.adapters["default"].lora_magnitude_vector.shape == (1, 6, 1, 1)
    assert start.embed.adapters["default"].lora_magnitude_vector.shape == (4,)
    base, ours, theirs = conv_pair()
    got, expected = ours(x), theirs(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - base(x)).abs().max() > 1e-2
    square_loss(got).backward()
    square_loss(expected).backward()
    for key, mine, reference in adapter_grads(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6, msg=key)


def test_conv_dropout_in_train_mode_matches_peft() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("dora", r=2, alpha=4.0, dropout=0.3, target_modules=["0"]))
    randomize_adapters(ours, seed=4)
    theirs = peft_model(base, r=2, lora_alpha=4.0, lora_dropout=0.3, target_modules=["0"], use_dora=True)
    ours_to_peft(ours, theirs)
    ours.train(), theirs.train()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.manual_seed(9)
        got = ours(x)
        torch.manual_seed(9)
        torch.testing.assert_close(got, theirs(x), rtol=1e-5, atol=1e-6)


def test_conv_and_embedding_merge_unmerge_and_files(tmp_path) -> None:
    from lightning_lora.io import load_adapter, save_adapter
    from lightning_lora.surgery import merge, unmerge

    base, ours, theirs = conv_pair()
    x = token_batch()
    weights = {path: layer.weight.detach().clone() for path, layer in adapters(ours).items()}
    with torch.no_grad():
        expected = ours(x)
        merge(ours)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
        unmerge(ours)
    for path, layer in adapters(ours).items():
        torch.testing.assert_close(layer.weight, weights[path], rtol=0, atol=1e-7)
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    import peft

    from_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    from_peft = copy.deepcopy(base)
    load_adapter(from_peft, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(from_ours(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_peft(x), expected, rtol=1e-5, atol=1e-6)


def test_conv_and_embedding_fit_and_resume(tmp_path) -> None:
    """A Trainer.fit with DoRA on the plain model's embedding and convolution lowers the loss, and resuming from a
    checkpoint ends where an uninterrupted run does."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from tiny_modules import PlainModule, TokensDataModule, trainer

    import lightning_lora as ll

    def dora() -> ll.LoRACallback:
        return ll.LoRACallback(method="dora", r=2, target_modules=["embed", "conv", "head"])

    pl.seed_everything(0)
    straight = PlainModule(lr=0.1)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer(tmp_path / "a", [dora(), Record()], max_epochs=4).fit(straight, TokensDataModule())
    assert sum(losses[-8:]) < sum(losses[:8])
    assert isinstance(straight.net.conv.adapters["default"], DoRAConvUpdate)
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", [dora(), checkpoint], max_epochs=2).fit(PlainModule(lr=0.1), TokensDataModule())
    resumed = PlainModule(lr=0.1)
    trainer(tmp_path / "b", [dora()], max_epochs=4).fit(resumed, TokensDataModule(), ckpt_path=checkpoint.last_model_path)
    expected, actual = ll.adapter_state_dict(straight.net), ll.adapter_state_dict(resumed.net)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_dora_refuses_grouped_convolutions_before_changing_the_model() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="grouped convolutions"):
        inject(model, AdapterConfig.create("dora", r=2, target_modules=["0"]))
    assert not adapters(model)


def test_small_magnitude_changes_reach_a_bfloat16_output() -> None:
    """In bfloat16, (m/||W|| - 1) W x is far below the spacing of W x; added to W x on its own it rounds away. Summed
    with the LoRA term first, the change survives in expectation (the LoRA term dithers the rounding)."""
    torch.manual_seed(0)
    base = nn.Linear(512, 512, bias=False, dtype=torch.bfloat16)
    nn.init.normal_(base.weight, std=0.02)
    model = nn.Sequential(base)
    inject(model, LoRAConfig(method="dora", r=16, alpha=32, target_modules=["0"]))
    layer, dora = model[0], model[0].adapters["default"]
    x = torch.randn(512, 512, dtype=torch.bfloat16)
    eps = 1e-3
    with torch.no_grad():
        dora.lora_B.weight.normal_(std=1e-3)  # about the size a few training steps give
        dora.lora_magnitude_vector.copy_(dora.column_norm(layer.weight))
        plain = F.linear(x, layer.weight).float()
        before = model(x).float()
        dora.lora_magnitude_vector.mul_(1 + eps)
        after = model(x).float()
    share = ((after - before) * plain).sum() / (eps * (plain * plain).sum())
    assert share > 0.5, f"only {share:.2f} of a {eps:.1%} magnitude change reached the output"


def test_conv_and_embedding_forward_compile_in_one_graph() -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    inject(model, AdapterConfig.create("dora", r=2, target_modules=["embed", "conv2"]))
    for layer, x in ((model.embed, token_batch()), (model.conv2, torch.randn(2, 4, 5, 5))):
        explained = torch._dynamo.explain(layer)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
