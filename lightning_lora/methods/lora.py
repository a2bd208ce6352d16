"""LoRA (Hu et al. 2021, arXiv 2106.09685): h = W0 x + (alpha / r) B A x, with rsLoRA's alpha / sqrt(r) as an option.

Tensor names follow PEFT (``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``) so that export is a
rename. A starts Kaiming-uniform (or Gaussian), B starts at zero: the adapted model begins as the base model.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from ..config import ConfigError, LoRAConfig
from ..targeting import pattern_value
from ._dropout import dropout_linear, plain_dropout
from .base import AdaptedLayer, WeightUpdate, base_kind

CONV_BY_DIMS = {1: (nn.Conv1d, F.conv1d), 2: (nn.Conv2d, F.conv2d), 3: (nn.Conv3d, F.conv3d)}


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapter weights train in float32 over a half-precision (or quantized) base, as PEFT's default does: bfloat16
    rounds away most AdamW updates of a LoRA factor or a DoRA magnitude near 1. The matmuls still run in the
    activations' dtype (see ``LoRAUpdate.forward``)."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def factory(base_layer: nn.Module) -> dict:
    return {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer.weight)}


class LoRAUpdate(WeightUpdate):
    """LoRA on a linear-like layer (``nn.Linear``, ``Conv1D``)."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(config)
        in_features, out_features = base_kind(base_layer).dims(base_layer)
        self.r, self.alpha, self.scaling = r, alpha, config.scaling(r, alpha)
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory(base_layer))
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory(base_layer))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        init_lora(self.lora_A.weight, self.lora_B.weight, config.init_weights, r)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out += scaling * B A dropout(x)`` on 2-D ``x``/``out``, with A and B cast to the output's dtype and the
        update accumulated by the second GEMM itself (no full-size ``* scaling`` or ``+`` kernels). Without autograd
        (decoding), A and B in the output's dtype are kept between calls instead of cast each time."""
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not (
                self.training and isinstance(self.lora_dropout, nn.Dropout)):
            a_t, b_t = self._inference_factors(out.dtype)
            return out.addmm_(x.mm(a_t), b_t, alpha=self.scaling)
        if not torch.is_grad_enabled() and x.shape[0] <= DECODE_ROWS and not (  # compiled decoding (training: no
                self.training and isinstance(self.lora_dropout, nn.Dropout)):  # guard on the rows)
            return decode_update(x, out, self.lora_A.weight, self.lora_B.weight, self.scaling)
        drop = self._modules["lora_dropout"]
        if plain_dropout(drop):  # backward keeps x (shared with the base) and the mask as bits, not a dropped copy
            after_a = dropout_linear(x, self.lora_A.weight.to(out.dtype), drop.p).to(out.dtype)
        else:
            after_a = F.linear(drop(x), self.lora_A.weight.to(out.dtype)).to(out.dtype)
        return out.addmm_(after_a, self.lora_B.weight.to(out.dtype).t(), alpha=self.scaling)

    def _inference_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """A^T and B^T in ``dtype``, cast once and kept until either weight changes: replaced, written in place (its
        version counter, bumped by optimizer steps and loads) or given new data (``.data =``, ``.to``: the kept
        detached source holds the old storage, so a new one cannot reuse its address); a copy only when the dtypes
        differ (r * (in + out) values). Reads the parameters without ``nn.Module.__getattr__`` (the decode path),
        unless they are computed (``torch.nn.utils.parametrize``: a new tensor each time, so cast each time)."""
        try:
            a = self._modules["lora_A"]._parameters["weight"]
            b = self._modules["lora_B"]._parameters["weight"]
        except KeyError:
            a, b = self.lora_A.weight, self.lora_B.weight
        c = self.__dict__.get("_factors")
        if (c is None or c[0] is not a or c[1] is not b or c[2] is not dtype or c[3] != a._version
                or c[4] != b._version or c[5] != a.data_ptr() or c[6] != b.data_ptr()):
            a_src, b_src = a.detach(), b.detach()
            c = (a, b, dtype, a._version, b._version, a.data_ptr(), b.data_ptr(),
                 a_src.to(dtype).t(), b_src.to(dtype).t(), a_src, b_src)
            self.__dict__["_factors"] = c
        return c[7], c[8]

    @classmethod
    def decode_plan(cls, updates: list[WeightUpdate]) -> Optional[LoRADecodePlan]:
        """``LoRADecodePlan`` when every update runs LoRA's forward (not DoRA's, a subclass with its own)."""
        if all(type(u).forward is LoRAUpdate.forward for u in updates):
            return LoRADecodePlan(updates)
        return None

    def lora_weight(self) -> Tensor:
        """B A in (out_features, in_features) layout."""
        return self.lora_B.weight @ self.lora_A.weight

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return self.lora_weight() * self.scaling


# Compiled without autograd, inputs of at most this many rows (decoding) take ``decode_update``; 0: never.
DECODE_ROWS = 16


def decode_update(x: Tensor, out: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``out + scaling * B A x`` for a few rows, written as products and sums instead of two GEMMs, for compiled
    decoding: Inductor generates the two small reductions itself and fuses them with their neighbours (the casts of A
    and B, the add into the base output), where the GEMM form launches two tiny cuBLAS kernels per layer and step
    (the bulk of unmerged decoding's cost under CUDA graphs). Same rounding points as the GEMM path: A and B in the
    output's dtype, float32 sums, ``x A^T`` rounded once, the sum with ``out`` rounded once. Eager it would
    materialize ``rows x r x in`` products, so only the compiled path calls it."""
    dtype = out.dtype
    h = (x.unsqueeze(1).float() * a.to(dtype).unsqueeze(0).float()).sum(-1).to(dtype)  # (rows, r)
    delta = (h.unsqueeze(1).float() * b.to(dtype).unsqueeze(0).float()).sum(-1)  # (rows, out_features)
    return (out.float() + delta * scaling).to(dtype)


class LoRADecodePlan:
    """An ``nn.Linear`` ``AdaptedLayer``'s forward without autograd over unmerged LoRA updates, for batch-1 decoding,
    where the host's time per layer is the cost: the same operators in the same order as the general path (one
    ``linear``, then per update ``x A^T`` and an ``addmm_`` of it times B^T into the output, hence equal outputs), minus
    the per-update ``nn.Module`` calls, name lookups and checks. ``AdaptedLayer._plain_state`` builds it and drops it
    when the layer's state changes; a call it cannot take (an update in training mode with dropout, or a hook on an
    update module, which its call would run) returns None and runs the general path. Deep copies and pickles
    follow the model (it holds the updates, never the layer)."""

    def __init__(self, updates: list[WeightUpdate]) -> None:
        self.updates = tuple(updates)

    def __call__(self, layer: AdaptedLayer, x: Tensor) -> Optional[Tensor]:
        for u in self.updates:
            if ((u.training and isinstance(u._modules["lora_dropout"], nn.Dropout)) or u._forward_hooks
                    or u._forward_pre_hooks or u._backward_hooks or u._backward_pre_hooks):
                return None
        if (_module._global_forward_pre_hooks or _module._global_forward_hooks or _module._global_backward_pre_hooks
                or _module._global_backward_hooks):  # what nn.Module.__call__ checks
            return None
        try:
            weight, bias = layer._parameters["weight"], layer._parameters["bias"]
        except KeyError:  # computed (torch.nn.utils.parametrize)
            weight, bias = layer.weight, layer.bias
        shape = x.shape
        flat = x if len(shape) == 2 else x.reshape(-1, shape[-1])  # 2-D already (tokens x features): no views
        out = F.linear(flat, weight, bias)
        for u in self.updates:
            a_t, b_t = u._inference_factors(out.dtype)
            out.addmm_(flat.mm(a_t), b_t, alpha=u.scaling)
        return out if flat is x else out.view(*shape[:-1], out.shape[-1])


class LoRAConvUpdate(WeightUpdate):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a convolution like the base's (same padding mode), B a 1x1 convolution."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(config)
        if base_layer.groups != 1:
            raise ConfigError(f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported.")
        self.r, self.alpha, self.scaling = r, alpha, config.scaling(r, alpha)
        conv, _ = CONV_BY_DIMS[len(base_layer.kernel_size)]
        self.lora_A = conv(base_layer.in_channels, r, base_layer.kernel_size, base_layer.stride, base_layer.padding,
                           base_layer.dilation, bias=False, padding_mode=base_layer.padding_mode, **factory(base_layer))
        self.lora_B = conv(r, base_layer.out_channels, 1, bias=False, **factory(base_layer))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        init_lora(self.lora_A.weight, self.lora_B.weight, config.init_weights, r)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out + scaling * B(A(dropout(x)))``."""
        dtype = out.dtype
        after_a = self.lora_A._conv_forward(self.lora_dropout(x).to(dtype), self.lora_A.weight.to(dtype), None)
        after_b = self.lora_B._conv_forward(after_a.to(dtype), self.lora_B.weight.to(dtype), None)
        return out + after_b * self.scaling

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        # Composing A (in -> r, kernel k) with B (r -> out, 1x1) is a convolution of A's kernels by B.
        _, conv_fn = CONV_BY_DIMS[self.lora_A.weight.dim() - 2]
        return conv_fn(self.lora_A.weight.transpose(0, 1), self.lora_B.weight).transpose(0, 1) * self.scaling


class LoRAEmbeddingUpdate(WeightUpdate):
    """LoRA on ``nn.Embedding``: row lookup in A, then B. As in PEFT, A starts at zero and B is random."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(config)
        num, dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.r, self.alpha, self.scaling = r, alpha, config.scaling(r, alpha)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num, **factory(base_layer)))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, **factory(base_layer)))
        nn.init.normal_(self.lora_embedding_B)
        if config.init_weights is False:
            nn.init.normal_(self.lora_embedding_A)

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out + scaling * B A[x]`` (no dropout on lookups, as in PEFT)."""
        m = layer.original_module
        after_a = F.embedding(x, self.lora_embedding_A.T, m.padding_idx, m.max_norm, m.norm_type,
                              m.scale_grad_by_freq, m.sparse)
        return out + (after_a @ self.lora_embedding_B.T * self.scaling).to(out.dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling


UPDATES = {"linear": LoRAUpdate, "conv": LoRAConvUpdate, "embedding": LoRAEmbeddingUpdate}


def init_lora(a: Tensor, b: Tensor, init_weights: bool | str, r: int) -> None:
    """A as in ``nn.Linear`` (Kaiming-uniform) or Gaussian, B zero; ``False`` leaves B random too (for tests)."""
    with torch.no_grad():
        if init_weights == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_weights is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)


def rank_and_alpha(config: LoRAConfig, path: str) -> tuple[int, float]:
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.alpha)
    return r, alpha


def check_rank(base_layer: nn.Module, r: int, path: str) -> None:
    kind = base_kind(base_layer)
    in_features, out_features = kind.dims(base_layer)
    if kind.family == "conv":  # A reads a whole receptive field, so the update's rank can reach in * k
        in_features *= math.prod(base_layer.kernel_size)
    limit = min(in_features, out_features)
    if r > limit:
        raise ConfigError(
            f"r={r} is larger than {path} allows (its shape is {in_features} -> {out_features}, so r <= {limit}); "
            "lower r or set a smaller rank for it with rank_pattern."
        )


def build_lora(base_layer: nn.Module, config: LoRAConfig, path: str) -> WeightUpdate:
    r, alpha = rank_and_alpha(config, path)
    check_rank(base_layer, r, path)
    if config.changes_base:  # PiSSA/OLoRA (lora_init.py builds on this module, hence the late import)
        from .lora_init import build_residual_lora

        return build_residual_lora(base_layer, config, r, alpha, path)
    return UPDATES[base_kind(base_layer).family](base_layer, config, r, alpha)


def supports_lora(module: nn.Module) -> bool:
    return base_kind(module) is not None
