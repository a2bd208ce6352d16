"""LoRA dropout that keeps the mask as bits (``methods/_dropout.py``): the same masks, outputs and gradients as
``nn.Dropout`` before A (and as PEFT), 1/8 byte kept per input element instead of a dropped copy and a bool mask, the
plain module call where the dropout is replaced or hooked, and one compiled graph without breaks or recompiles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, make_llama
from peft_oracle import PEFT_WARNINGS, adapter_grads, ours_to_peft, peft_model, randomize_adapters, square_loss
from test_compile import CountingBackend
from torch import Tensor, nn
from torch._dynamo.utils import counters

from lightning_lora.config import AdapterConfig
from lightning_lora.methods._dropout import dropout_linear, pack_bits, unpack_bits
from lightning_lora.mixed import adapter_batch
from lightning_lora.plugins.compile import CompilePolicy, compile_regions
from lightning_lora.surgery import adapters, inject

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


class PlainDropout(nn.Dropout):
    """``nn.Dropout`` under another class: LoRA calls it as a module (the path before bit masks)."""


def tokens(seed: int = 0) -> Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def lora_llama(dropout: float, **options) -> nn.Module:
    model = make_llama(0)
    inject(model, AdapterConfig.create("lora", r=4, target_modules=TARGETS, dropout=dropout, **options))
    randomize_adapters(model, seed=1)
    return model.train()


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("columns", [16, 13, 1])
def test_bits_round_trip(columns: int) -> None:
    mask = torch.rand(5, columns, generator=torch.Generator().manual_seed(columns)) > 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (columns + 7) // 8)
    assert torch.equal(unpack_bits(packed, columns), mask)


def test_compiled_packing_gives_the_same_bytes() -> None:
    """Compiled, the bits are packed without dtype views of bool tensors (which Inductor does not lower on CUDA:
    "torch.bool is not supported by torch.iinfo", seen on an H200), into the same bytes as in eager mode."""
    mask = torch.rand(6, 21, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = torch.compile(pack_bits, fullgraph=True, backend="aot_eager")(mask)  # the compiled branch, without
    assert torch.equal(packed, pack_bits(mask))  # Inductor's C++ build (10 s here; the regional-compile test runs it)
    assert torch.equal(torch.compile(unpack_bits, fullgraph=True, backend="aot_eager")(packed, 21), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_output_and_gradients_as_dropout_then_linear(dtype: torch.dtype) -> None:
    """Same seed, same mask as ``F.dropout``: output, input and weight gradients bit for bit (bf16: as the CPU's
    dropout rounds its scale)."""
    x0 = torch.randn(64, 40, dtype=dtype, generator=torch.Generator().manual_seed(0))
    w0 = torch.randn(8, 40, dtype=dtype, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(64, 8, dtype=dtype, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (lambda x, w: F.linear(F.dropout(x, 0.3, training=True), w), lambda x, w: dropout_linear(x, w, 0.3)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.manual_seed(3)
        y = fn(x, w)
        y.backward(weights)
        results.append((y, x.grad, w.grad))
    for plain, ours in zip(*results):
        assert torch.equal(plain, ours)
    assert 0.2 < (results[1][1] == 0).float().mean() < 0.4  # the input gradient is zero where dropped


def test_drops_the_expected_fraction_scaled_and_eval_is_the_identity() -> None:
    """In training about p of the input is dropped (the rest scaled by 1/(1-p), seen through A's gradient with A = I);
    in eval the adapter sees x itself, with autograd or without."""
    layer = nn.Sequential(nn.Linear(64, 64, bias=False))
    inject(layer, AdapterConfig.create("lora", r=64, target_modules=["0"], dropout=0.25, init_weights=False))
    update = layer[0].adapters["default"]
    x = torch.ones(512, 64)
    layer.train()
    layer(x).sum().backward()
    # out = W x + s B A drop(x): dL/dA = s B^T 1 drop(x)^T summed over rows; per input column: s (B^T 1) * kept/(1-p)
    per_column = update.lora_A.weight.grad / (update.scaling * update.lora_B.weight.sum(0)).unsqueeze(1)
    kept = per_column / (x.shape[0] / 0.75)  # the fraction of rows that kept each column
    assert 0.72 < kept.mean() < 0.78
    layer.eval()
    expected = F.linear(x, layer[0].weight) + update.scaling * x @ update.lora_A.weight.T @ update.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


def test_model_gradients_equal_the_module_call_and_peft() -> None:
    """Seeded training step of a tiny Llama with dropout on q/k/v/down: the bit-mask path gives the gradients of
    calling ``nn.Dropout`` before A (exactly) and of PEFT's LoRA (to float tolerance)."""
    ours = lora_llama(0.3)
    plain = copy.deepcopy(ours)
    for layer in adapters(plain).values():
        layer.adapters["default"].lora_dropout = PlainDropout(0.3)
    theirs = peft_model(make_llama(0), r=4, lora_alpha=16, lora_dropout=0.3, target_modules=TARGETS).train()
    ours_to_peft(ours, theirs)
    for model in (ours, plain, theirs):
        torch.manual_seed(5)
        square_loss(model(tokens()).logits).backward()
    assert grads(ours).keys() == grads(plain).keys()
    for name, grad in grads(ours).items():
        assert torch.equal(grad, grads(plain)[name]), name
    for key, mine, reference in adapter_grads(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5, msg=key)


def saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes autograd keeps for backward of one forward, per distinct storage, less parameters and the input."""
    known = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(kept.values())


def test_keeps_the_mask_as_bits_not_a_dropped_copy() -> None:
    """Per adapted layer, dropout adds 1/8 byte per input element to what LoRA without dropout keeps; calling
    ``nn.Dropout`` adds the dropped copy and its mask (on the CPU, float32 noise: 8 bytes in float32)."""
    rows, features = 32, 40
    x = torch.randn(rows, features, requires_grad=True)

    def layer(dropout: float, module: type = nn.Dropout) -> nn.Module:
        model = nn.Sequential(nn.Linear(features, 24))
        inject(model, AdapterConfig.create("lora", r=4, target_modules=["0"], dropout=dropout))
        if dropout:
            model[0].adapters["default"].lora_dropout = module(dropout)
        return model.train()

    none = saved_bytes(layer(0.0), x)
    assert saved_bytes(layer(0.1), x) - none == rows * features // 8
    assert saved_bytes(layer(0.1, PlainDropout), x) - none == rows * features * 8  # the CPU dropout keeps float noise


def test_replaced_or_hooked_dropout_is_called() -> None:
    """A hook on the dropout module runs (so the module is called), and another module in its place is used."""
    model = lora_llama(0.3)
    seen = []
    update = model.model.layers[0].self_attn.q_proj.adapters["default"]
    handle = update.lora_dropout.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    model(tokens()).logits.sum().backward()
    assert len(seen) == 1
    handle.remove()
    update.lora_dropout = nn.Identity()
    torch.manual_seed(0)
    with_identity = model(tokens()).logits
    for layer in adapters(model).values():
        layer.adapters["default"].lora_dropout = nn.Identity()
    torch.manual_seed(0)
    assert not torch.equal(with_identity, model(tokens()).logits)  # the other layers still drop


def test_mixed_batch_with_one_dropout_equals_its_adapter_alone() -> None:
    """A mixed batch whose examples all name one adapter (two adapters, one dropout probability) draws the masks the
    adapter alone draws: the same gradients."""
    model = make_llama(0)
    for name, seed in (("a", 1), ("b", 2)):
        inject(model, dict(method="lora", r=2, dropout=0.3, target_modules=TARGETS, init_weights=False), seed=seed,
               name=name)
    model.train()
    alone = copy.deepcopy(model)
    for layer in adapters(alone).values():
        layer.active_adapters = ("a",)
    torch.manual_seed(4)
    square_loss(alone(tokens()).logits).backward()
    torch.manual_seed(4)
    with adapter_batch(model, ["a", "a"]):
        square_loss(model(tokens()).logits).backward()
    expected = {n: g for n, g in grads(alone).items() if g is not None}
    assert expected and all(".a." in n for n in expected)
    for name, grad in expected.items():
        torch.testing.assert_close(grads(model)[name], grad, rtol=1e-4, atol=1e-4, msg=name)


def test_compiled_blocks_with_dropout_have_no_graph_break_or_recompile() -> None:
    """Regional compile of a LoRA model with dropout: one training graph for every block (fullgraph), one eval graph,
    nothing more over a second epoch."""
    torch._dynamo.reset()
    counters.clear()
    try:
        model = lora_llama(0.1)
        backend = CountingBackend()
        compile_regions(model, CompilePolicy(enabled=True, backend=backend, fullgraph=True))
        phases = []
        for _ in range(2):
            model.train()
            square_loss(model(tokens()).logits).backward()
            phases.append(list(backend.compiles))
            model.eval()
            with torch.inference_mode():
                model(tokens())
            phases.append(list(backend.compiles))
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert all(n == 0 for _, n in phases[0]), phases[0]
        assert phases[3] == phases[1], "the second epoch compiled again"
    finally:
        torch._dynamo.reset()
