"""Two memory options the LoRA benchmark can time beside the plain step (issue 8), kept out of the library until they
are measured (a model-level loss is outside what the callback can do generically):

- ``fused_linear_cross_entropy``: the causal-LM loss over a frozen output head without the full logits. Predicted
  (1B shapes, batch 4 x 2048, vocabulary 128,256): HF's loss holds bf16 logits (2.0 GiB), their float32 copy
  (3.9 GiB) and log-softmax's float32 output for backward (3.9 GiB), about 8-10 GiB at the loss; this keeps one chunk's
  float32 logits and probabilities (2 x 0.5 GiB at 1,024 tokens) and the hidden-state gradient (32 MiB). Peak -6 to
  -8 GiB eager, less compiled (Inductor already fuses part of the loss); time -2% to +3% (the same two GEMMs, the
  head's weight gradient is never needed because the head is frozen; less elementwise traffic).
- ``selective_checkpointing``: each decoder layer under non-reentrant checkpointing that saves the adapted linear
  layers' outputs (``addmm``: under compile, LoRA's in-place ``out.addmm_`` is functionalized into one) and attention
  outputs, and recomputes the rest (norms, rotary, SiLU * up, the base ``mm`` feeding each ``addmm``). Compiled only:
  in eager mode the base output a LoRA update writes into in place cannot be a cached SAC entry (torch refuses).
  Predicted: -15% to -25% of activation memory against plain regional compile, time +2% to +5%; Inductor's
  partitioner already recomputes cheap elementwise ops, so the gain may be smaller than that.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

IGNORE = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, chunk by chunk; the gradient for ``hidden`` is
    computed in forward (softmax minus one-hot, times the weight) so no logits are kept for backward. ``weight`` gets
    no gradient (a frozen head)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        valid_count = (labels != IGNORE).sum().clamp_min(1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            y = labels[start:start + chunk]
            valid = (y != IGNORE).unsqueeze(1)
            target = y.clamp_min(0).unsqueeze(1)
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += ((lse - logits.gather(1, target)) * valid).sum()
            if grad is not None:
                probs = logits.sub_(lse).exp_()  # softmax, in the logits' buffer
                probs.scatter_add_(1, target, -valid.float())
                probs.mul_(valid)
                grad[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad, valid_count)
        return total / valid_count

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad, valid_count = ctx.saved_tensors
        scale = (grad_output / valid_count).to(grad.dtype) if grad is not None else None
        return (grad * scale if grad is not None else None), None, None, None


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """HF's causal-LM loss (next-token targets, mean over non-ignored tokens) over ``hidden`` (batch, seq, h) and a
    frozen head ``weight`` (vocab, h), without materializing the logits."""
    if weight.requires_grad:
        raise ValueError("fused_linear_cross_entropy gives the output head no gradient; use it with a frozen head")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    return _FusedLinearCrossEntropy.apply(h, weight, y, chunk)


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder (returning hidden states) and the output head of a transformers causal LM, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.lm_head


def selective_checkpointing(model: nn.Module) -> int:
    """Put each decoder layer's forward under non-reentrant checkpointing that saves ``addmm`` (adapted linear
    outputs) and attention outputs and recomputes everything else (``torch.utils.checkpoint``'s selective policy);
    for compiled models only (see the module docstring). Returns the layers wrapped."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    save = {aten.addmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            save.add(getattr(aten, name).default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    context = functools.partial(create_selective_checkpoint_contexts, policy)
    decoder, _ = causal_lm_parts(model)
    for layer in decoder.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False, context_fn=context)
    return len(decoder.layers)
