"""Inference cost of adapters: merged (or disabled) adapted layers run exactly the base model's operators, and
unmerged LoRA without autograd adds its two matmuls and nothing else (no per-call casts of A and B), with the same
tokens as PEFT."""

from __future__ import annotations

import contextlib
from collections import Counter
from copy import deepcopy
from typing import Iterator

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_lora as ll
from lightning_lora import surgery
from lightning_lora.hotswap import hotswap_adapter
from lightning_lora.methods.lora import DECODE_ROWS, LoRADecodePlan
from conftest import make_llama
from peft_oracle import ours_to_peft, peft_model, randomize_adapters


class Ops(TorchDispatchMode):
    """Records the ATen operators a block of code runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def ops(model: torch.nn.Module, ids: torch.Tensor) -> list[str]:
    with torch.no_grad(), Ops() as recorded:
        model(input_ids=ids)
    return recorded.names


def adapted_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = make_llama().to(dtype)
    ll.inject(model, ll.AdapterConfig.create("lora", r=4, target_modules="all-linear"))
    randomize_adapters(model, seed=3)
    return model


IDS = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))


def test_merged_or_disabled_adapters_run_the_base_operators_only() -> None:
    base_ops = ops(make_llama(), IDS)
    model = adapted_llama()
    unmerged = model(input_ids=IDS).logits
    assert len(ops(model, IDS)) > len(base_ops)
    ll.merge(model)
    assert ops(model, IDS) == base_ops
    torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    ll.unmerge(model)
    with ll.disable_adapters(model):
        assert ops(model, IDS) == base_ops
        torch.testing.assert_close(model(input_ids=IDS).logits, make_llama()(input_ids=IDS).logits)
    assert len(ops(model, IDS)) > len(base_ops)  # adapters on again: the state is not stuck on the fast path


def test_unmerged_decode_adds_two_matmuls_per_layer_and_no_casts() -> None:
    """bf16 model with float32 adapters: without autograd, A and B are cast once, then each adapted layer adds one
    matmul and one addmm; the result equals the training path's exactly, and follows a weight update."""
    model = adapted_llama(torch.bfloat16)
    for p in surgery.adapter_parameters(model):
        p.data = p.data.float()
    base_ops = ops(make_llama().to(torch.bfloat16), IDS)
    with torch.enable_grad():
        training_path = model(input_ids=IDS).logits.detach()
    ops(model, IDS)  # the first call casts A and B once
    extra = Counter(ops(model, IDS)) - Counter(base_ops)
    layers = len(ll.adapters(model))
    # per adapted layer: x A^T, the addmm into the base output, and one view (2-D in, the base output's shape out)
    assert extra == Counter({"aten.mm": layers, "aten.addmm_": layers, "aten.view": layers}), extra
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, training_path)
        layer = next(iter(ll.adapters(model).values())).adapters["default"]
        layer.lora_B.weight.mul_(2)  # an in-place write, as an optimizer step does
        changed = model(input_ids=IDS).logits
    with torch.enable_grad():
        assert torch.equal(changed, model(input_ids=IDS).logits.detach())


def test_greedy_tokens_equal_peft_unmerged_and_merged() -> None:
    model = adapted_llama()
    peft = peft_model(make_llama(), r=4, lora_alpha=16, target_modules="all-linear")
    ours_to_peft(model, peft)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = peft.generate(input_ids=IDS, **kwargs)
    assert torch.equal(model.generate(input_ids=IDS, **kwargs), theirs)
    ll.merge(model)
    assert torch.equal(model.generate(input_ids=IDS, **kwargs), theirs)


CASTS = (torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default)
GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
PREFILL = torch.randint(3, 64, (1, DECODE_ROWS + 4), generator=torch.Generator().manual_seed(1))  # the GEMM path


def compiled(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The no-grad logits of ``model`` compiled (AOT-traced ATen graph, run as traced), and the graph's numbers of
    casts and of GEMMs."""
    graphs = []

    def record(gm: torch.fx.GraphModule, _: object) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled_model = torch.compile(model, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    with torch.no_grad():
        logits = compiled_model(input_ids=ids).logits
    torch._dynamo.reset()
    targets = [node.target for gm in graphs for node in gm.graph.nodes]
    return logits, sum(t in CASTS for t in targets), sum(t in GEMMS for t in targets)


def test_adapters_cast_to_the_activations_dtype_serve_without_casts() -> None:
    """The serving recipe: float32 adapters over a bf16 base, their parameters cast to bf16 (only theirs: a whole
    ``model.to`` would also cast buffers such as HF's float32 rotary ``inv_freq``), give the same logits bit for bit,
    since the forward rounds A and B to bf16 anyway; eager, nothing is cast or copied even on the first call;
    compiled with more than ``DECODE_ROWS`` rows (a prompt), the graph has the base model's casts only (float32
    adapters would add two per layer, each step). Compiled decoding (a few rows) runs no GEMM per update at all (see
    ``decode_update``), and gives the eager logits."""
    model = make_llama(layers=1).to(torch.bfloat16)  # one decoder layer: three compiles stay quick
    ll.inject(model, ll.AdapterConfig.create("lora", r=4, target_modules="all-linear"))
    randomize_adapters(model, seed=3)
    for p in surgery.adapter_parameters(model):
        p.data = p.data.float()
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
    serving = deepcopy(model)
    for p in surgery.adapter_parameters(serving):
        p.data = p.data.to(torch.bfloat16)
    first = Counter(ops(serving, IDS)) - Counter(ops(serving, IDS))  # what the first call adds: views only
    assert set(first) == {"aten.detach", "aten.t"}, first  # the kept factors are views of the parameters
    with torch.no_grad():
        assert torch.equal(serving(input_ids=IDS).logits, reference)
    fresh = deepcopy(model)  # float32 adapters: cast once, on the first call
    assert (Counter(ops(fresh, IDS)) - Counter(ops(fresh, IDS)))["aten._to_copy"] == 2 * len(ll.adapters(model))

    layers = len(ll.adapters(model))
    with torch.no_grad():
        prefill = model(input_ids=PREFILL).logits
    with ll.disable_adapters(model):
        _, base_casts, base_gemms = compiled(model, PREFILL)
    logits, casts, gemms = compiled(serving, PREFILL)
    assert (casts, gemms) == (base_casts, base_gemms + 2 * layers)
    assert torch.equal(logits, prefill)
    logits, _, gemms = compiled(serving, IDS)  # decoding: the updates as fused reductions
    assert gemms == base_gemms
    torch.testing.assert_close(logits, reference)


# -- the decode plan (LoRADecodePlan): the general path's operators without its per-update module calls -------------
@contextlib.contextmanager
def general_path(model: torch.nn.Module) -> Iterator[list[int]]:
    """Every LoRA update gets a no-op forward hook, which the decode plan must not bypass: the layers take the general
    path (``AdaptedLayer._run``); yields the hooks' call count."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    handles = [u.register_forward_hook(hook) for layer in ll.adapters(model).values() for u in layer.adapters.values()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def plans(model: torch.nn.Module) -> list[object]:
    """Each adapted layer's decode plan as its last forward kept it (None: none)."""
    return [layer.__dict__.get("_plain", (None, None, None))[2] for layer in ll.adapters(model).values()]


def assert_fast_equals_general(model: torch.nn.Module, expect_plan: bool = True) -> torch.Tensor:
    """The no-grad logits with the decode plan equal the general path's exactly; returns them."""
    with torch.no_grad():
        fast = model(input_ids=IDS).logits
        used = plans(model)
        with general_path(model) as calls:
            general = model(input_ids=IDS).logits
    assert torch.equal(fast, general)
    if expect_plan:
        assert all(isinstance(p, LoRADecodePlan) for p in used), used
        assert calls[0] > 0  # the reference really took the general path
    return fast


def two_adapter_llama(dtype: torch.dtype, adapters: int) -> torch.nn.Module:
    model = make_llama().to(dtype)
    for i in range(adapters):  # alpha != r: the scaling is not 1
        ll.inject(model, ll.AdapterConfig.create("lora", r=4, alpha=4 * (i + 2), target_modules="all-linear"),
                  name=f"a{i}")
    surgery.set_active_adapters(model, [f"a{i}" for i in range(adapters)])
    randomize_adapters(model, seed=5)
    return model


@pytest.mark.parametrize("adapters", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_plan_equals_general_path(dtype: torch.dtype, adapters: int) -> None:
    model = two_adapter_llama(dtype, adapters)
    fast = assert_fast_equals_general(model)
    with torch.enable_grad():  # the training path's operators give the same numbers too
        assert torch.equal(fast, model(input_ids=IDS).logits.detach())


def test_decode_plan_follows_every_change_of_state(tmp_path) -> None:
    """Optimizer steps, loads, hot-swaps, adapter switches, disable, merge/unmerge, deletion, deep copies and dtype
    moves each change what the plan must compute; after each it still equals the general path. A bf16 base with
    float32 adapters: the plan keeps bf16 copies of A and B, which each change must renew."""
    model = two_adapter_llama(torch.bfloat16, 2)
    before = assert_fast_equals_general(model)

    params = list(surgery.adapter_parameters(model))
    optimizer = torch.optim.SGD(params, lr=0.1)
    model(input_ids=IDS).logits.square().mean().backward()
    optimizer.step()  # in-place writes to A and B
    stepped = assert_fast_equals_general(model)
    assert not torch.equal(stepped, before)

    other = make_llama()
    ll.inject(other, ll.AdapterConfig.create("lora", r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(other, seed=9)
    ll.save_adapter(other, tmp_path / "other")
    hotswap_adapter(model, str(tmp_path / "other"), name="a0")
    swapped = assert_fast_equals_general(model)
    assert not torch.equal(swapped, stepped)

    ll.load_adapter(model, tmp_path / "other", name="loaded")  # a third update on every layer
    surgery.set_active_adapters(model, ["loaded", "a1"])
    assert_fast_equals_general(model)
    surgery.set_active_adapters(model, ["a1"])
    only_a1 = assert_fast_equals_general(model)

    with ll.disable_adapters(model):
        assert_fast_equals_general(model, expect_plan=False)
        assert all(p is None for p in plans(model))
    assert torch.equal(assert_fast_equals_general(model), only_a1)

    ll.merge(model)
    with torch.no_grad():
        merged = model(input_ids=IDS).logits
    assert all(p is None for p in plans(model))  # merged: the plain path, no plan
    torch.testing.assert_close(merged, only_a1, rtol=0.05, atol=0.05)  # bf16 rounding of the merged weight
    ll.unmerge(model)
    assert torch.equal(assert_fast_equals_general(model), only_a1)

    surgery.set_active_adapters(model, ["a0", "a1"])
    surgery.delete_adapter(model, "a1")
    assert_fast_equals_general(model)

    copy = deepcopy(model)  # the copy's plans follow the copy's tensors, not the original's
    with torch.no_grad():
        for layer in ll.adapters(copy).values():
            layer.adapters["a0"].lora_B.weight.mul_(3)
    assert not torch.equal(assert_fast_equals_general(copy), assert_fast_equals_general(model))

    model.float()  # float32 activations: the kept bf16 casts no longer serve
    assert assert_fast_equals_general(model).dtype == torch.float32
    model.double()  # new tensors under the same parameters (.data): the kept casts are redone
    assert assert_fast_equals_general(model).dtype == torch.float64


def test_decode_plan_does_not_bypass_hooks_on_an_update() -> None:
    model = two_adapter_llama(torch.float32, 1)
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    update = ll.adapters(model)["model.layers.0.self_attn.q_proj"].adapters["a0"]
    seen = []
    handle = update.register_forward_hook(lambda module, args, out: seen.append(1) or out * 2)
    with torch.no_grad():
        hooked = model(input_ids=IDS).logits
    assert seen and not torch.equal(hooked, plain)  # the hook ran and its output counted
    handle.remove()
    pre = update.register_forward_pre_hook(lambda module, args: seen.append(2))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, plain)
    assert seen[-1] == 2
    pre.remove()
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    try:
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, plain)
    finally:
        handle.remove()
    assert "LoRAUpdate" in calls  # a global hook sees the update modules too
    assert_fast_equals_general(model)  # hooks gone: the plan again


def test_decode_plan_with_dropout_in_train_and_eval_mode() -> None:
    model = make_llama()
    ll.inject(model, ll.AdapterConfig.create("lora", r=4, dropout=0.5, target_modules="all-linear"))
    randomize_adapters(model, seed=2)
    eval_out = assert_fast_equals_general(model)  # eval: dropout off, the plan runs
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = model(input_ids=IDS).logits
        assert all(isinstance(p, LoRADecodePlan) for p in plans(model))  # kept, but it declines each call
        torch.manual_seed(0)
        with general_path(model):
            general = model(input_ids=IDS).logits
    assert torch.equal(dropped, general) and not torch.equal(dropped, eval_out)
    model.eval()
    assert torch.equal(assert_fast_equals_general(model), eval_out)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("adapters", [1, 2])
@pytest.mark.parametrize("dims", [3, 2])
def test_decode_plan_runs_the_minimal_operators(bias: bool, adapters: int, dims: int) -> None:
    """One adapted nn.Linear without autograd: its linear, then per update one mm and one addmm_ (A^T and B^T kept
    cast), and on (batch, tokens, features) input the two views between 3-D and 2-D (2-D input: none); nothing else.
    The output equals the general path's."""
    holder = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=bias)).to(torch.bfloat16)
    for i in range(adapters):
        ll.inject(holder, ll.AdapterConfig.create("lora", r=2, target_modules=["0"], init_weights=False),
                  name=f"a{i}")
    surgery.set_active_adapters(holder, [f"a{i}" for i in range(adapters)])
    x = torch.randn(3, 16, dtype=torch.bfloat16).view((1, 3, 16)[-dims:])
    with torch.no_grad():
        holder(x)  # casts A and B to bf16 once
        with Ops() as recorded:
            fast = holder(x)
        with general_path(holder) as calls:
            general = holder(x)
    linear = ["t", "addmm"] if bias else ["t", "mm"]
    views = ["view"] if dims == 3 else []
    assert recorded.names == [f"aten.{n}" for n in [*views, *linear, *["mm", "addmm_"] * adapters, *views]]
    assert calls[0] == adapters and fast.shape == x.shape[:-1] + (8,) and torch.equal(fast, general)


class Doubled(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2


def test_decode_plan_reads_parametrized_weights() -> None:
    """A weight computed by ``torch.nn.utils.parametrize`` (the base's or a factor's) is read as the general path reads
    it, every call."""
    from torch.nn.utils import parametrize

    model = two_adapter_llama(torch.bfloat16, 1)
    before = assert_fast_equals_general(model)
    layer = ll.adapters(model)["model.layers.0.mlp.down_proj"]
    parametrize.register_parametrization(layer, "weight", Doubled())
    parametrize.register_parametrization(layer.adapters["a0"].lora_A, "weight", Doubled())
    doubled = assert_fast_equals_general(model)
    assert not torch.equal(doubled, before)
    parametrize.remove_parametrizations(layer.adapters["a0"].lora_A, "weight", leave_parametrized=False)
    assert not torch.equal(assert_fast_equals_general(model), doubled)
