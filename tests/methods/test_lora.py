"""LoRA against PEFT as the oracle: same tensors in both, same outputs and the same gradients."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, make_gpt2, make_llama, make_plain
from peft_oracle import PEFT_WARNINGS, adapter_grads, logits, ours_to_peft, peft_model, randomize_adapters, square_loss
from torch import Tensor, nn

from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.methods.base import AdaptedLayer
from lightning_lora.methods.lora import LoRAConvUpdate, LoRAEmbeddingUpdate, LoRAUpdate
from lightning_lora.io import load_adapter, save_adapter
from lightning_lora.surgery import adapters, inject


pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]


class ConvNet(nn.Module):
    """2-D convolutions with padding, stride and a 1x1 kernel, then a linear head (no dilation: PEFT ignores it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(8, 6, 1, bias=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.down(h))
        return self.head(self.mix(h).mean((2, 3)))


def make_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


def make_tied_llama(seed: int = 0) -> nn.Module:
    return make_llama(seed, tie=True)


def token_batch() -> Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def image_batch() -> Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))


# (id, model factory, input factory, our options; PEFT gets the same targets/r/alpha/patterns/rslora)
CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], Tensor], dict[str, Any]]] = [
    ("llama-all-linear", make_llama, token_batch, {"target_modules": "all-linear", "r": 4, "alpha": 8.0}),
    ("gpt2-conv1d", make_gpt2, token_batch, {"target_modules": ["c_attn", "c_proj", "c_fc"], "r": 4, "alpha": 4.0}),
    ("llama-embedding", make_llama, token_batch, {"target_modules": ["embed_tokens", "v_proj"], "r": 4, "alpha": 6.0}),
    ("plain-embed-conv1d-linear", make_plain, token_batch,
     {"target_modules": ["embed", "conv", "block.0", "block.2", "head"], "r": 3, "alpha": 5.0}),
    ("conv2d", make_convnet, image_batch, {"target_modules": ["stem", "down", "mix", "head"], "r": 2, "alpha": 3.0}),
    ("conv2d-rank-above-in-channels", make_convnet, image_batch, {"target_modules": ["stem"], "r": 6, "alpha": 3.0}),
    ("llama-tied-embeddings", make_tied_llama, token_batch,
     {"target_modules": ["embed_tokens", "lm_head", "q_proj"], "r": 4, "alpha": 8.0}),
    ("rslora", make_llama, token_batch, {"target_modules": ["q_proj", "up_proj"], "r": 4, "alpha": 8.0,
                                         "use_rslora": True}),
    ("rank-alpha-patterns", make_llama, token_batch,
     {"target_modules": ["q_proj", "v_proj", "gate_proj"], "r": 4, "alpha": 8.0,
      "rank_pattern": {"v_proj": 2, r"model\.layers\.1\.mlp\.gate_proj": 7}, "alpha_pattern": {"q_proj": 1.5}}),
]
IDS = [c[0] for c in CASES]
PARAMS = [c[1:] for c in CASES]


def to_peft_options(options: dict[str, Any]) -> dict[str, Any]:
    """Our LoRA options in ``peft.LoraConfig``'s names."""
    renamed = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
    return {renamed.get(k, k): v for k, v in options.items()}


def build_pair(make: Callable[[], nn.Module], options: dict[str, Any],
               seed: int = 7) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, ours, PEFT's) from one base; our random adapter tensors copied into PEFT's."""
    base = make()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("lora", **options))
    randomize_adapters(ours, seed)
    theirs = peft_model(base, **to_peft_options(options))
    ours_to_peft(ours, theirs)
    return base, ours, theirs


@pytest.mark.parametrize("make,inputs,options", PARAMS, ids=IDS)
def test_same_output_as_peft(make: Callable[[], nn.Module], inputs: Callable[[], Tensor],
                             options: dict[str, Any]) -> None:
    base, ours, theirs = build_pair(make, options)
    x = inputs()
    with torch.no_grad():
        expected, got, base_out = logits(theirs, x), logits(ours, x), logits(base, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base_out).abs().max() > 1e-3, "the adapters should change the output"


@pytest.mark.parametrize("make,inputs,options", PARAMS, ids=IDS)
def test_same_gradients_as_peft(make: Callable[[], nn.Module], inputs: Callable[[], Tensor],
                                options: dict[str, Any]) -> None:
    _, ours, theirs = build_pair(make, options)
    x = inputs()
    square_loss(logits(ours, x)).backward()
    square_loss(logits(theirs, x)).backward()
    grads = adapter_grads(ours, theirs)
    assert grads
    for key, mine, reference in grads:
        assert mine is not None and reference is not None, key
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5, msg=key)
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


@pytest.mark.parametrize("make,inputs,options", PARAMS, ids=IDS)
def test_default_init_starts_as_the_base_model(make: Callable[[], nn.Module], inputs: Callable[[], Tensor],
                                               options: dict[str, Any]) -> None:
    base = make()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("lora", **options))
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, x), logits(base, x), rtol=0, atol=1e-6)
    for layer in adapters(ours).values():
        adapter = layer.adapters["default"]
        zero = adapter.lora_embedding_A if isinstance(adapter, LoRAEmbeddingUpdate) else adapter.lora_B.weight
        other = adapter.lora_embedding_B if isinstance(adapter, LoRAEmbeddingUpdate) else adapter.lora_A.weight
        assert torch.count_nonzero(zero) == 0 and torch.count_nonzero(other) > 0


def test_gaussian_init_draws_a_with_std_one_over_r() -> None:
    torch.manual_seed(0)
    layer = nn.Module()
    layer.proj = nn.Linear(256, 256)
    inject(layer, AdapterConfig.create("lora", target_modules=["proj"], r=16, init_weights="gaussian"))
    adapter = layer.proj.adapters["default"]
    assert torch.count_nonzero(adapter.lora_B.weight) == 0
    assert adapter.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.05)


def test_adapter_layer_reuses_the_base_parameters() -> None:
    """The base weight and bias are the same Parameter objects, so state dict keys and tied weights are kept."""
    model = make_gpt2()
    weight, bias = model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.bias
    base_keys = set(model.state_dict())
    inject(model, AdapterConfig.create("lora", target_modules=["c_attn"], r=2))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, AdaptedLayer) and isinstance(layer.adapters["default"], LoRAUpdate)
    assert layer.kind.fan_in_fan_out
    assert layer.weight is weight and layer.bias is bias
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == {f"transformer.h.{i}.attn.c_attn.adapters.default.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}


def test_layer_classes_per_base_type() -> None:
    model = make_plain()
    inject(model, AdapterConfig.create("lora", target_modules=["embed", "conv", "head"], r=2))
    assert all(isinstance(m, AdaptedLayer) for m in (model.embed, model.conv, model.head))
    conv = model.conv.adapters["default"]
    assert isinstance(model.embed.adapters["default"], LoRAEmbeddingUpdate)
    assert isinstance(conv, LoRAConvUpdate) and conv.lora_A.kernel_size == (3,) and conv.lora_B.kernel_size == (1,)
    assert isinstance(model.head.adapters["default"], LoRAUpdate)


def test_dilated_convolution_matches_its_merged_weight() -> None:
    """lora_A takes the base kernel's stride, padding and dilation, so forward equals the merged conv.

    PEFT (0.21) builds lora_A without the base's dilation, so its forward disagrees with its own merge here.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, dilation=2, padding=2))
    inject(model, AdapterConfig.create("lora", target_modules=["0"], r=2, init_weights=False))
    layer = model[0]
    lora_a = layer.adapters["default"].lora_A
    assert lora_a.dilation == (2, 2) and lora_a.stride == (2, 2) and lora_a.padding == (2, 2)
    x = image_batch()
    with torch.no_grad():
        merged = F.conv2d(x, layer.merged_weight(), layer.bias, stride=2, padding=2, dilation=2)
        torch.testing.assert_close(model(x), merged, rtol=1e-5, atol=1e-5)


def test_grouped_convolution_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="grouped convolutions"):
        inject(model, AdapterConfig.create("lora", target_modules=["0"], r=2))
    assert type(model[0]) is nn.Conv2d


# -- dropout ---------------------------------------------------------------------------------------------------------
DROPOUT = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "alpha": 8.0, "dropout": 0.5}


def test_dropout_in_train_mode_matches_peft() -> None:
    """Same seed, same masks: PEFT and we draw one dropout mask per adapted layer, in the same order."""
    base, ours, theirs = build_pair(make_llama, DROPOUT)
    ours.train(), theirs.train()
    x = token_batch()
    with torch.no_grad():
        torch.manual_seed(3)
        got = logits(ours, x)
        torch.manual_seed(3)
        expected = logits(theirs, x)
        torch.manual_seed(4)
        other_mask = logits(ours, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - other_mask).abs().max() > 1e-4, "dropout should be active in train mode"


def test_dropout_is_off_in_eval_mode() -> None:
    _, ours, theirs = build_pair(make_llama, DROPOUT)
    _, no_dropout, _ = build_pair(make_llama, {**DROPOUT, "dropout": 0.0})
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, x), logits(no_dropout, x), rtol=0, atol=0)
        torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


def test_dropout_touches_only_the_adapter_input() -> None:
    """With B = 0 the train-mode output is the base output exactly; with B != 0 it is base(x) + s B A drop(x)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    expected_base = model(x).detach()
    inject(model, AdapterConfig.create("lora", target_modules=["0"], r=3, alpha=6.0, dropout=0.5))
    model.train()
    torch.testing.assert_close(model(x), expected_base, rtol=0, atol=0)

    layer = model[0]
    randomize_adapters(model, seed=1)
    torch.manual_seed(5)
    got = model(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    update = layer.adapters["default"]
    expected = F.linear(x, layer.weight, layer.bias) + 2.0 * dropped @ update.lora_A.weight.T @ update.lora_B.weight.T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_no_dropout_module_when_dropout_is_zero() -> None:
    model = make_plain()
    inject(model, AdapterConfig.create("lora", target_modules=["head", "conv"], r=2))
    assert all(isinstance(m.adapters["default"].lora_dropout, nn.Identity) for m in (model.head, model.conv))


def test_scaling_formula() -> None:
    model = make_plain()
    inject(model, AdapterConfig.create("lora", target_modules=["head", "block.0"], r=4, alpha=6.0,
                                       rank_pattern={"head": 2}))
    assert model.block[0].adapters["default"].scaling == pytest.approx(6.0 / 4)
    assert model.head.adapters["default"].scaling == pytest.approx(6.0 / 2)
    rs = make_plain()
    inject(rs, AdapterConfig.create("lora", target_modules=["head"], r=4, alpha=6.0, use_rslora=True))
    assert rs.head.adapters["default"].scaling == pytest.approx(6.0 / math.sqrt(4))


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head"]], ids=["embedding", "lm-head"])
def test_adapter_on_tied_weights_round_trips_through_peft(tmp_path: Path, targets: list[str]) -> None:
    """An adapter on one of two tied modules saves in PEFT's layout; PEFT and we load it to the same outputs."""
    import peft

    _, ours, _ = build_pair(make_tied_llama, {"target_modules": targets, "r": 4, "alpha": 8.0})
    save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(make_tied_llama(), str(tmp_path / "a")).eval()
    fresh = make_tied_llama()
    load_adapter(fresh, tmp_path / "a")
    x = token_batch()
    with torch.no_grad():
        expected = logits(ours, x)
        torch.testing.assert_close(logits(theirs, x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(fresh, x), expected, rtol=0, atol=0)
        assert (expected - logits(make_tied_llama(), x)).abs().max() > 1e-3
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
