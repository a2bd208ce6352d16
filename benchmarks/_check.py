"""Correctness before timing: our LoRA/DoRA against PEFT with identical adapter weights on a small random Llama of the
timed shapes: logits, loss and adapter gradients after one backward pass, relative to PEFT's largest value.

* float32 base, TF32 off: the same math, so they must agree to ``--rtol`` (1e-3);
* bf16 base, each library's default adapters (float32 in both; PEFT casts the activations up to float32 for the
  adapter matmuls, we cast the adapter weights down to bf16), so they must agree to ``--bf16-rtol`` (0.1). Gradients
  that flow back through a bf16 network carry its rounding: PEFT's own bf16-adapter path lands 3-6% (of the largest
  value) from its default on 1B shapes, and the check prints that yardstick beside each row.
"""

from __future__ import annotations

import copy
import gc

import torch
from torch import nn

import lightning_lora as ll
from lightning_lora import surgery

from _models import LLAMA_1B, TINY, build_base, llama_config, param_dtypes, wrap_ours, wrap_peft


def check_against_peft(method: str, args, device: str, base_dtype: torch.dtype = torch.float32) -> bool:
    """Ours (library defaults) against PEFT (its default, float32 adapters) with identical adapter weights."""
    half = base_dtype != torch.float32
    label = f"{method}, {'bf16' if half else 'fp32'} base"
    rtol = args.bf16_rtol if half else args.rtol
    config = llama_config(TINY if args.tiny else LLAMA_1B, args.check_layers)
    base = build_base(config, base_dtype, device, seed=1)
    ours = wrap_ours(copy.deepcopy(base), method, args.r, args.alpha, random_b=True)
    peft = wrap_peft(copy.deepcopy(base), method, args.r, args.alpha)
    # the yardstick on a bf16 base: PEFT with bf16 adapter weights against PEFT's default
    peft_bf16 = wrap_peft(copy.deepcopy(base), method, args.r, args.alpha, bf16_adapters=True) if half else None
    del base
    ours_layers = {path: layer.adapters["default"] for path, layer in ll.adapters(ours).items()}  # update modules
    inner = peft.base_model.model
    peft_paths = {n for n, m in inner.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}
    if set(ours_layers) != peft_paths:
        print(f"[check {label}] FAIL: targets differ: only ours {sorted(set(ours_layers) - peft_paths)}, "
              f"only PEFT {sorted(peft_paths - set(ours_layers))}")
        return False
    names = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if method == "dora" else [])

    def peft_tensor(model: nn.Module, path: str, name: str) -> torch.Tensor:
        return getattr(model.base_model.model.get_submodule(path), name)["default"].weight

    def ours_tensor(path: str, name: str) -> torch.Tensor:
        t = getattr(ours_layers[path], name)
        return t.weight if isinstance(t, nn.Linear) else t

    gen = torch.Generator(device="cpu").manual_seed(2)
    with torch.no_grad():
        for path, layer in ours_layers.items():
            if method == "dora":  # move m away from ||W0 + sBA|| so the magnitude path is exercised
                noise = 1 + 0.1 * torch.randn(layer.lora_magnitude_vector.shape, generator=gen)
                layer.lora_magnitude_vector.mul_(noise.to(device))
            for name in names:
                for other in (peft, peft_bf16):
                    if other is not None:
                        peft_tensor(other, path, name).copy_(ours_tensor(path, name))
    ours_params = list(surgery.adapter_parameters(ours))
    peft_params = [p for p in peft.parameters() if p.requires_grad]
    n_ours, n_peft = surgery.parameter_counts(ours)[0], sum(p.numel() for p in peft_params)
    dt_ours, dt_peft = param_dtypes(ours_params), param_dtypes(peft_params)

    ids = torch.randint(3, config.vocab_size, (args.check_batch, args.check_seq), generator=gen).to(device)

    def forward_backward(model: nn.Module, tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {(path, name): tensor(path, name).grad for path in ours_layers for name in names}
        return out.logits.detach(), out.loss.detach(), grads

    def rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
        """max|a - b|, that relative to max|b|, and ||a - b|| / ||b|| (L2 over the whole tensor)"""
        a, b = a.detach().float(), b.detach().float()
        diff = (a - b).abs().max().item()
        l2 = torch.linalg.vector_norm(a - b).item() / max(torch.linalg.vector_norm(b).item(), 1e-30)
        return diff, diff / max(b.abs().max().item(), 1e-30), l2

    def compare(mine, theirs) -> list[tuple[str, float, float, float]] | str:
        rows = [("logits", *rel(mine[0], theirs[0])), ("loss", *rel(mine[1], theirs[1]))]
        for name in names:
            worst = (0.0, 0.0, 0.0)
            for path in ours_layers:
                a, b = mine[2][(path, name)], theirs[2][(path, name)]
                if a is None or b is None:
                    return f"no gradient for {path}.{name}"
                worst = max(worst, rel(a, b), key=lambda t: t[1])
            rows.append((f"grad {name}", *worst))
        return rows

    res_ours = forward_backward(ours, ours_tensor)
    res_peft = forward_backward(peft, lambda path, name: peft_tensor(peft, path, name))
    rows = compare(res_ours, res_peft)
    yard = None
    if peft_bf16 is not None:
        yard = compare(forward_backward(peft_bf16, lambda path, name: peft_tensor(peft_bf16, path, name)), res_peft)
    if isinstance(rows, str) or isinstance(yard, str):
        print(f"[check {label}] FAIL: {rows if isinstance(rows, str) else yard}")
        return False
    ok = n_ours == n_peft
    # on a half-precision base the library's default is float32 adapter weights, as PEFT's: check it still is
    dtype_ok = dt_ours == dt_peft == "fp32"
    ok &= dtype_ok
    print(f"[check {label}] {len(ours_layers)} adapted layers, trainable params ours {n_ours:,} ({dt_ours}) / "
          f"PEFT {n_peft:,} ({dt_peft}){'' if n_ours == n_peft and dtype_ok else '  MISMATCH'}")
    for i, (what, diff, relative, l2) in enumerate(rows):
        good = relative <= rtol
        ok &= good
        extra = ""
        if yard is not None:
            extra = f"  [PEFT bf16-adapters vs PEFT: {yard[i][2]:.1e}, L2 rel {yard[i][3]:.1e}]"
        print(f"[check {label}]   {what:26s} max|diff| {diff:.2e}  / max|PEFT| {relative:.2e}  {'ok' if good else 'FAIL'}"
              f" (rtol {rtol:g})  L2 rel {l2:.1e}{extra}")
    del ours, peft, peft_bf16, res_ours, res_peft
    gc.collect()
    return ok


def check_fused_cross_entropy(args, device: str) -> bool:
    """The fused linear cross-entropy (``_memory_options``) against HF's loss on the float32 check model: the loss and
    every adapter gradient must agree to ``--rtol``."""
    from _memory_options import causal_lm_parts, fused_linear_cross_entropy

    config = llama_config(TINY if args.tiny else LLAMA_1B, args.check_layers)
    model = wrap_ours(build_base(config, torch.float32, device, seed=1), "lora", args.r, args.alpha, random_b=True)
    gen = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(3, config.vocab_size, (args.check_batch, args.check_seq), generator=gen).to(device)
    params = list(surgery.adapter_parameters(model))
    hf = model(input_ids=ids, labels=ids).loss
    hf_grads = torch.autograd.grad(hf, params)
    decoder, head = causal_lm_parts(model)
    fused = fused_linear_cross_entropy(decoder(input_ids=ids).last_hidden_state, head.weight, ids, chunk=100)
    fused_grads = torch.autograd.grad(fused, params)
    loss_rel = abs(fused.item() - hf.item()) / abs(hf.item())
    grad_rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(fused_grads, hf_grads))
    ok = loss_rel <= args.rtol and grad_rel <= args.rtol
    print(f"[check fused CE, fp32] loss {fused.item():.6f} vs HF {hf.item():.6f} (rel {loss_rel:.1e}); adapter grads "
          f"max rel {grad_rel:.1e}  {'ok' if ok else 'FAIL'} (rtol {args.rtol:g})")
    del model
    gc.collect()
    return ok
