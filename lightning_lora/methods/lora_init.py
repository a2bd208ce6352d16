"""LoRA started from the base weight itself: PiSSA (Meng et al. 2024, arXiv 2404.02948) and OLoRA (Büyükakyüz 2024,
arXiv 2406.01775).

Both split the base weight W into a rank-r part, which A and B start as, and a residual, which the layer keeps as its
base: ``W = W_res + s B0 A0``, so the adapted model starts as the base model. PiSSA takes the r principal singular
components (``B0 = U_r sqrt(S_r / s)``, ``A0 = sqrt(S_r / s) V_r^T``; ``pissa_niter_<n>``: from a randomized SVD with
n subspace iterations), OLoRA the first r columns of a QR decomposition (``B0 = Q_r``, ``A0 = R_r``). The math is
PEFT's (``LoraLayer.pissa_init``/``olora_init``), so the same base gives the same A0, B0 and residual.

The base weight changes at injection (``surgery.attach``, never while only preparing) and is restored by ``unload``
up to float rounding. An adapter file must work on the original base, so it holds the plain LoRA of rank 2r that
gives the same update (PEFT's ``path_initial_model_for_weight_conversion``):
``s B A - s B0 A0 = s [B | -B0] [A ; A0]``. A0 and B0 are kept as buffers (in checkpoints too): a resumed run
rebuilds the residual from them, whatever a second decomposition would have rounded differently.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ..config import ConfigError, LoRAConfig
from .base import DEQUANTIZERS, AdaptedLayer, base_kind, linear_weight
from .lora import LoRAUpdate


@torch.no_grad()
def principal_factors(weight: Tensor, r: int, scaling: float, init: str) -> tuple[Tensor, Tensor]:
    """(A0, B0) of ``init`` for ``weight`` in (out, in) layout, float32, with ``scaling * B0 @ A0`` the part of the
    weight they take over."""
    weight = weight.float()
    if init == "olora":
        q, upper = torch.linalg.qr(weight)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:  # pissa_niter_<n>: randomized SVD (Halko et al.), drawing from the (seeded) global RNG
        u, s, v = torch.svd_lowrank(weight, r, niter=int(init.removeprefix("pissa_niter_")))
        vh = v.T
    root = (s / scaling).sqrt()
    return (root[:, None] * vh).contiguous(), (u * root).contiguous()


class ResidualLoRAUpdate(LoRAUpdate):
    """LoRA on ``nn.Linear``/``Conv1D`` whose A and B start as part of the base weight (PiSSA, OLoRA); the layer's
    weight holds the residual while the adapter is attached. ``lora_A_init``/``lora_B_init`` are A0 and B0."""

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float) -> None:
        super().__init__(base_layer, config, r, alpha)
        kind = base_kind(base_layer)
        a0, b0 = principal_factors(linear_weight(base_layer.weight, kind), r, self.scaling, config.init_weights)
        with torch.no_grad():
            self.lora_A.weight.copy_(a0)
            self.lora_B.weight.copy_(b0)
        self.register_buffer("lora_A_init", self.lora_A.weight.detach().clone())
        self.register_buffer("lora_B_init", self.lora_B.weight.detach().clone())
        object.__setattr__(self, "_layer", None)  # the layer whose base holds our residual (not a submodule)

    def init_delta(self) -> Tensor:
        """``s B0 A0`` in (out, in) layout, float32: what the base gave the adapter."""
        return (self.lora_B_init.float() @ self.lora_A_init.float()) * self.scaling

    def _shift_base(self, layer: AdaptedLayer, delta: Tensor) -> None:
        with torch.no_grad():
            new = (layer.linear_weight().float() + delta).to(layer.weight.dtype)
            layer.weight.copy_(linear_weight(new, layer.kind))  # back to the layer's layout (Conv1D is transposed)

    def on_attach(self, layer: AdaptedLayer) -> None:
        """W -> W - s B0 A0. The base fingerprint keeps describing W (``layer.source_sample``): files and checkpoints
        belong to the original base."""
        from .. import fingerprint

        if getattr(layer, "source_sample", None) is None:
            layer.source_sample = fingerprint.sample(layer.weight)
        self._shift_base(layer, -self.init_delta())
        object.__setattr__(self, "_layer", layer)

    def on_detach(self, layer: AdaptedLayer) -> None:
        """Unmerged: W_res + s B0 A0 gives the original weight back (up to rounding). Merged, the weight already is
        W_res + s B A = W + the trained update, which is what a merged unload means. A quantized residual (QPiSSA)
        cannot take the principal part back in place: it stays the residual, with a warning."""
        if not self.merged and self._layer is layer:
            if type(layer.weight) in DEQUANTIZERS:
                warnings.warn("lightning_lora: the unloaded layer keeps its quantized PiSSA/OLoRA residual (the "
                              "principal part cannot be added to a quantized weight in place); reload the original "
                              "base, or merge with lightning_lora.quantize.merge_quantized first.", stacklevel=3)
                return
            self._shift_base(layer, self.init_delta())
            layer.source_sample = None
            object.__setattr__(self, "_layer", None)

    def base_shift(self, layer: AdaptedLayer) -> Optional[Tensor]:
        return -self.init_delta() if self._layer is layer else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        """Loading A0/B0 (a checkpoint) re-bases the residual on them: W_res = W - s B0 A0 with the loaded values."""
        before = self.init_delta() if self._layer is not None and not self.merged else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if before is not None:
            after = self.init_delta()
            if not torch.equal(before, after):
                self._shift_base(self._layer, before - after)

    def file_tensors(self) -> dict[str, Tensor]:
        """The plain LoRA of rank 2r with the same update on the original base: ``[A ; A0]`` and ``[B | -B0]``."""
        return {"lora_A.weight": torch.cat([self.lora_A.weight, self.lora_A_init.to(self.lora_A.weight.dtype)], 0),
                "lora_B.weight": torch.cat([self.lora_B.weight, -self.lora_B_init.to(self.lora_B.weight.dtype)], 1)}


def build_residual_lora(base_layer: nn.Module, config: LoRAConfig, r: int, alpha: float, path: str) -> LoRAUpdate:
    """``ResidualLoRAUpdate`` for a linear-like layer; other layers are refused by name (PEFT's PiSSA/OLoRA are
    linear too)."""
    kind = base_kind(base_layer)
    if kind.family != "linear":
        raise ConfigError(
            f"init_weights={config.init_weights!r} decomposes a linear layer's weight, and {path} is a "
            f"{type(base_layer).__name__}; leave it out with exclude_modules, or use init_weights=True."
        )
    if not base_layer.weight.is_floating_point() or type(base_layer.weight.data) is not torch.Tensor:
        raise ConfigError(f"init_weights={config.init_weights!r} needs a plain floating-point weight at {path}; "
                          "inject before quantizing the base (LoRACallback(quantize=...) does).")
    return ResidualLoRAUpdate(base_layer, config, r, alpha)
