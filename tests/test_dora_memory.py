"""DoRA's linear forward keeps one (tokens, out) tensor for backward, not two (``dora._DoRAOutput``), or none where it
recomputes the base output's share in backward (``RECOMPUTE_BASE``: the query and key projections), eager and compiled,
and computes what the plain autograd formula computes: outputs and gradients, with and without bias and dropout, over
a quantized base too (PEFT's outputs and gradients: tests/methods/test_dora.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_lora as ll
from lightning_lora.methods.dora import DoRAUpdate
from peft_oracle import randomize_adapters, square_loss


def autograd_reference(update: DoRAUpdate, layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The formula as autograd differentiates it (the implementation before ``_DoRAOutput``)."""
    dtype = out.dtype
    w = layer.linear_weight()
    scale = update.lora_magnitude_vector.float() / update.column_norm(w)
    if isinstance(update.lora_dropout, nn.Identity) or not update.training:
        x_in, base = x, (out if layer.bias is None else out - layer.bias)
    else:
        x_in = update.lora_dropout(x)
        base = nn.functional.linear(x_in.to(dtype), w.to(dtype))
    after_a = nn.functional.linear(x_in.to(dtype), update.lora_A.weight.to(dtype))
    lora = nn.functional.linear(after_a, update.lora_B.weight.to(dtype)) * update.scaling
    return out + ((scale - 1).to(dtype) * base + scale.to(dtype) * lora)


def dora_layer(bias: bool, dropout: float, adapters: int = 1, recompute: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10, bias=bias))
    ll.inject(model, ll.AdapterConfig.create("dora", r=3, dropout=dropout, target_modules=["0"]))
    randomize_adapters(model, seed=1)
    layer = model[0]
    with torch.no_grad():
        layer.adapters["default"].lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(10))
        if bias:
            layer.bias.requires_grad_(True)
    if adapters == 2:  # a second (zero) LoRA adapter on the layer: the result must not be kept (keep_output off)
        from lightning_lora.methods.lora import LoRAUpdate
        layer.adapters["other"] = LoRAUpdate(layer.original_module, layer.adapters["default"].config, 2, 4.0)
    layer.adapters["default"].recompute_base = recompute
    return layer.train()


@pytest.mark.parametrize(("bias", "dropout", "adapters", "recompute"), [
    (False, 0.0, 1, False), (True, 0.0, 1, False), (True, 0.3, 1, False), (True, 0.0, 2, False),
    (False, 0.0, 1, True), (True, 0.0, 1, True), (True, 0.3, 1, True), (True, 0.0, 2, True)])
def test_outputs_and_gradients_equal_the_autograd_formula(bias: bool, dropout: float, adapters: int,
                                                          recompute: bool) -> None:
    layer = dora_layer(bias, dropout, adapters, recompute)
    update = layer.adapters["default"]
    x = torch.randn(2, 7, 12, requires_grad=True)
    params = [x, update.lora_A.weight, update.lora_B.weight, update.lora_magnitude_vector] + ([layer.bias] if bias else [])
    results = []
    for forward in ("ours", "reference"):
        torch.manual_seed(5)  # the same dropout mask
        if forward == "ours":
            y = layer(x)
        else:
            x2 = x.reshape(-1, 12)
            y = autograd_reference(update, layer, x2, nn.functional.linear(x2, layer.weight, layer.bias))
            for other in list(layer.adapters.values())[1:]:
                y = other(layer, x2, y)
            y = y.view(2, 7, 10)
        grads = torch.autograd.grad(square_loss(y), params)
        results.append((y, grads))
    (y, grads), (y_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def saved_bytes(fn) -> tuple[int, list[torch.Tensor]]:
    """Bytes of distinct storages autograd keeps for backward while ``fn`` runs, and the kept tensors."""
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(storages.values()), kept, out


class Attention(nn.Module):
    """A layer named as a query projection (``RECOMPUTE_BASE``) and one that is not."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_in, d_out, bias=False)
        self.o_proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor, which: str = "o_proj") -> torch.Tensor:
        return getattr(self, which)(x)


def adapted_attention(method: str, d_in: int = 32, d_out: int = 48) -> Attention:
    torch.manual_seed(0)
    model = Attention(d_in, d_out)
    ll.inject(model, ll.AdapterConfig.create(method, r=4, target_modules=["q_proj", "o_proj"]))
    return model.train()


def test_build_recomputes_the_query_and_key_projections_only() -> None:
    from conftest import make_llama

    model = make_llama()
    ll.inject(model, ll.AdapterConfig.create("dora", r=2, target_modules="all-linear"))
    recompute = {path.rsplit(".", 1)[-1] for path, layer in ll.adapters(model).items()
                 if layer.adapters["default"].recompute_base}
    assert recompute == {"q_proj", "k_proj"}


@pytest.mark.parametrize("which", ["o_proj", "q_proj"])
def test_backward_keeps_the_output_itself_or_nothing_of_its_size(which: str) -> None:
    """LoRA keeps nothing of the output's size. DoRA keeps exactly one such tensor, the layer's own output (which the
    next operation usually keeps anyway), or on a query projection none at all."""
    tokens, d_in, d_out = 64, 32, 48
    x = torch.randn(tokens, d_in, requires_grad=True)
    sizes = {}
    for method in ("lora", "dora"):
        model = adapted_attention(method, d_in, d_out)
        total, kept, out = saved_bytes(lambda model=model: model(x, which))
        output_sized = [t for t in kept if t.numel() == tokens * d_out]
        sizes[method] = (total, output_sized, out)
    lora_total, lora_big, _ = sizes["lora"]
    dora_total, dora_big, dora_out = sizes["dora"]
    assert lora_big == []
    vectors = 4 * d_out * 4
    if which == "q_proj":
        assert dora_big == [] and dora_total - lora_total <= vectors
    else:
        assert len({t.untyped_storage().data_ptr() for t in dora_big}) == 1
        assert dora_big[0].untyped_storage().data_ptr() == dora_out.untyped_storage().data_ptr()
        assert dora_total - lora_total <= tokens * d_out * 4 + vectors  # the output and per-unit vectors


def compiled_saved_numels(model: nn.Module, x: torch.Tensor, which: str) -> list[int]:
    """Sizes of the activations the compiled graph hands from forward to backward (Inductor's decompositions and
    partitioner, as ``benchmarks/saved_memory.py``), graph inputs left out."""
    import functools

    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.compile_fx import select_decomp_table

    numels: list[int] = []

    def backward_compiler(gm, example_inputs):
        for node in gm.graph.find_nodes(op="placeholder"):
            if not node.name.startswith(("primals_", "tangents_")) and isinstance(node.meta.get("val"), torch.Tensor):
                numels.append(node.meta["val"].numel())
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=backward_compiler,
                           decompositions=select_decomp_table(),
                           partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))
    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend=backend, fullgraph=True)(x, which)
        (out.float() ** 2).sum().backward()  # a nonlinear loss, so backward needs the output's gradient per token
    finally:
        torch._dynamo.reset()
    return numels


def test_compiled_query_projection_keeps_nothing_of_the_output_size() -> None:
    """Compiled, DoRA's recompute must survive the compiler: written as ``x W^T`` again, common-subexpression
    elimination would merge it with the forward's base output and keep that after all. The forward here returns the
    output squared, which keeps nothing of the output (its gradient comes from the loss)."""
    tokens, d_in, d_out = 64, 32, 48
    x = torch.randn(tokens, d_in, requires_grad=True)
    saved = compiled_saved_numels(adapted_attention("dora", d_in, d_out), x, "q_proj")
    assert all(n < tokens * d_out for n in saved), saved
    # the same layer named otherwise keeps its output (the check can see one)
    assert any(n >= tokens * d_out for n in compiled_saved_numels(adapted_attention("dora", d_in, d_out), x, "o_proj"))


def test_recompute_through_a_quantized_base_equals_keeping_the_output() -> None:
    """Over an NF4 base, backward dequantizes the weight again: the magnitude's gradient equals the kept-output path's,
    and forward keeps no dense copy of the weight."""
    from test_quantize import FORMATS

    from lightning_lora.quantize import quantize_base

    x = torch.randn(16, 64, requires_grad=True)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = Attention(64, 64)
        ll.inject(model, ll.AdapterConfig.create("dora", r=4, init_weights=False, target_modules=["q_proj"]))
        quantize_base(model, FORMATS["nf4"])
        update = model.q_proj.adapters["default"]
        update.recompute_base = recompute
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = model(x, "q_proj")
        dense = [t for t in kept if type(t) in (torch.Tensor, nn.Parameter) and t.numel() == 64 * 64]
        assert dense == [], [(type(t), t.shape) for t in dense]
        grads.append(torch.autograd.grad(square_loss(out), update.lora_magnitude_vector)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)

