"""Inference cost of adapters: merged (or disabled) adapted layers run exactly the base model's operators, and
unmerged LoRA without autograd adds its two matmuls and nothing else (no per-call casts of A and B), with the same
tokens as PEFT."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_lora as ll
from lightning_lora import surgery
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
