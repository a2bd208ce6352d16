"""Mixed-adapter batches: each example of a batch names its adapter (or none), and one forward applies each
example's own update, in training as in inference and ``generate``, without a loop over the batch.

On each adapted layer the LoRA factors of the adapters in the batch are concatenated along the rank,
``A = [A_1; ...; A_n]`` and ``B = [B_1 ... B_n]``, and a per-example mask (built once per batch, not per layer) keeps
each example's own rank columns times its scaling: ``out += ((x A^T) * mask) B^T``. That is the kernels of one LoRA
(a cast and a GEMM for each factor, one multiply); the rank is wider, but these skinny GEMMs are bound by reading the
activations, so the cost stays about that of a single-adapter batch. Gradients reach each adapter only through its
own examples' columns, so every adapter gets exactly the gradient of its own examples. (A per-example gather of the
factors with batched GEMMs, tried first, cost 2.5x a single-adapter forward on an H200 at 1B shapes: about 30 small
kernels per layer.) Other weight-update methods take a generic path (each adapter's update computed on the whole
batch and selected per row: n update passes); methods that transform the base layer's input (OFT, BOFT, HRA) cannot
mix.

Rows are mapped to examples batch-major: a layer input of shape (batch * k, ...) or (batch, ...) (also a 2-D
(tokens, features) one, flattened from (batch, seq, features)) gives example ``i`` its ``i``-th slice, which is also
what ``generate`` does when it repeats examples for beams or several sequences per prompt.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError
from .methods.base import AdaptedLayer
from .methods.lora import LoRAUpdate
from .surgery import adapters, check_names

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names; None means the same


class BatchRoute:
    """The per-example adapters of one batch, as every ``AdaptedLayer.batch_route`` of the model holds them."""

    def __init__(self, names: list[str], index: Tensor) -> None:
        self.names = names  # the adapters in the batch; example i uses names[index[i]] (index -1: none)
        self.index = index
        self.positions = index.tolist()  # the same on the host: no data-dependent read inside a compiled forward
        self._on: dict[torch.device, Tensor] = {}
        self._masks: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.hook: Optional[torch.utils.hooks.RemovableHandle] = None

    def mask(self, present: list[tuple[int, LoRAUpdate]], device: torch.device, dtype: torch.dtype
             ) -> tuple[Tensor, Tensor]:
        """For the layers whose adapters (ranks, scalings) are ``present``: the (batch, 1, R) mask of each example's
        rank columns times its adapter's scaling, and each example's slot in ``present`` (for dropout;
        ``len(present)``: none). Cached, so that a forward builds and copies it once, not once per layer."""
        key = (tuple((k, u.r, u.scaling) for k, u in present), device, dtype)
        cached = self._masks.get(key)
        if cached is None:
            slot_of = {k: slot for slot, (k, _) in enumerate(present)}
            offsets, start = [], 0
            for _, update in present:
                offsets.append((start, start + update.r, update.scaling))
                start += update.r
            mask = torch.zeros(self.index.shape[0], 1, start)
            slots = torch.full((self.index.shape[0],), len(present))
            for i, k in enumerate(self.positions):
                if k in slot_of:
                    begin, end, scaling = offsets[slot_of[k]]
                    mask[i, 0, begin:end] = scaling
                    slots[i] = slot_of[k]
            cached = self._masks[key] = (mask.to(device=device, dtype=dtype), slots.to(device))
        return cached

    def check_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pre-hook on the model: its input's batch must be the examples named (or a multiple of them, as
        ``generate`` repeats each example for beams)."""
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0), None)
        if first is not None and first.shape[0] % self.index.shape[0]:
            raise ConfigError(
                f"{type(module).__name__} got a batch of {first.shape[0]} examples, but per-example adapters were "
                f"given for {self.index.shape[0]}; give one adapter name (or None) per example of the batch."
            )

    def rows(self, count: int, device: torch.device, expand: bool = True) -> Tensor:
        """The adapter index of each of ``count`` rows (examples batch-major, each repeated ``count / batch`` times)."""
        index = self._on.get(device)
        if index is None:
            index = self._on[device] = self.index.to(device)
        batch = index.shape[0]
        if count % batch:
            raise ConfigError(
                f"A layer got {count} rows for a batch of {batch} examples with per-example adapters; the rows must be "
                "the examples, batch-major (each repeated equally). Give one adapter name per example of the batch."
            )
        return index if count == batch or not expand else index.repeat_interleave(count // batch)

    def __call__(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        present = [(k, layer.adapters[n]) for k, n in enumerate(self.names) if n in layer.adapters]
        if not present:
            return out
        if layer.kind.family == "linear" and all(type(u) is LoRAUpdate for _, u in present):
            self.rows(x.shape[0], x.device, expand=False)  # checks the rows are the examples
            return _lora_rows(layer, x, out, present, self)
        rows = self.rows(x.shape[0], x.device)
        for k, update in present:  # any other method: its update on every row, kept on its own rows
            delta = update(layer, x, out.clone()) - out
            keep = (rows == k).view(-1, *[1] * (out.dim() - 1)).to(out.dtype)
            out = out + delta * keep
        return out


def _factors(layer: AdaptedLayer, present: list[tuple[int, LoRAUpdate]], dtype: torch.dtype, device: torch.device
             ) -> tuple[Tensor, Tensor]:
    """The present adapters' A (R, in) and B (out, R), concatenated and cast. Without autograd (serving) they are
    kept on the layer until a factor changes (an optimizer step, a hot-swap, a load: each bumps the tensor's version),
    so a forward runs three kernels per layer, one fewer than a single LoRA."""
    weights = [t for _, u in present for t in (u.lora_A.weight, u.lora_B.weight)]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in weights)
    if not grad:
        key = (tuple(id(u) for _, u in present), dtype, device)
        stamp = tuple((t.data_ptr(), t._version) for t in weights)
        cached = layer.__dict__.setdefault("_mixed_factors", {}).get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
    if len(present) == 1:
        a, b = present[0][1].lora_A.weight.to(dtype), present[0][1].lora_B.weight.to(dtype)
    else:
        a = torch.cat([u.lora_A.weight for _, u in present]).to(dtype)
        b = torch.cat([u.lora_B.weight for _, u in present], dim=1).to(dtype)
    if not grad:
        layer.__dict__["_mixed_factors"] = {key: (stamp, a, b)}  # the last mix only: a few MiB at most per layer
    return a, b


def _lora_rows(layer: AdaptedLayer, x: Tensor, out: Tensor, present: list[tuple[int, LoRAUpdate]],
               route: BatchRoute) -> Tensor:
    """``out`` plus each example's own LoRA update, in three GEMM-side kernels as a single LoRA: ``x`` through the
    present adapters' A concatenated along the rank, times a per-example mask that keeps that example's adapter's rank
    columns (its scaling folded in; zeros for none), then through their B concatenated. The wider rank costs little:
    these skinny GEMMs are bound by reading ``x``, not by the rank."""
    dtype = out.dtype
    a, b = _factors(layer, present, dtype, x.device)
    mask, slots = route.mask(present, x.device, dtype)  # (batch, 1, R)
    row_slots = lambda: slots.repeat_interleave(x.shape[0] // mask.shape[0])  # noqa: E731
    hidden = F.linear(_dropout(x, present, row_slots), a)  # (rows, R)
    hidden = (hidden.view(mask.shape[0], -1, hidden.shape[-1]) * mask).view(hidden.shape)
    return out.addmm_(hidden, b.t())


def _dropout(x: Tensor, present: list[tuple[int, LoRAUpdate]], row_slots: Callable[[], Tensor]) -> Tensor:
    """Each row's adapter's dropout on its input (one draw per row: a row meets one adapter only). ``row_slots``
    gives each row's slot among ``present`` (``len(present)``: none)."""
    ps = [u.lora_dropout.p if isinstance(u.lora_dropout, nn.Dropout) and u.lora_dropout.training else 0.0
          for _, u in present]
    if not any(ps):
        return x
    if len(set(ps)) == 1:
        return F.dropout(x, ps[0], training=True)
    keep = (1 - torch.tensor([*ps, 0.0], device=x.device, dtype=x.dtype)[row_slots()]).unsqueeze(1)
    return x * torch.bernoulli(keep.expand_as(x)) / keep


def set_batch_adapters(model: nn.Module, names: Sequence[Optional[str]]) -> None:
    """Make each example ``i`` of the following forwards use adapter ``names[i]`` (None or ``"__base__"``: the base
    alone), until ``clear_batch_adapters``. The model is unchanged on error (an unknown name, a merged adapter, a
    method that cannot mix)."""
    if isinstance(names, str) or not hasattr(names, "__len__") or not len(names):
        raise ConfigError(f"Per-example adapters must be a list with one adapter name (or None) per example, got "
                          f"{names!r}.")
    wanted = [n for n in names if n is not None and n != BASE]
    check_names(model, dict.fromkeys(wanted))
    layers = [a for a in adapters(model).values() if isinstance(a, AdaptedLayer)]
    in_batch = list(dict.fromkeys(wanted))
    for layer in layers:
        for name in in_batch:
            update = layer.adapters[name] if name in layer.adapters else None
            if update is None:
                continue
            if update.merged:
                raise ConfigError(f"Adapter {name!r} is merged into the weights, so it would apply to every example; "
                                  "unmerge(model) before a mixed-adapter batch.")
            if getattr(update, "transforms_input", False):
                raise ConfigError(f"Adapter {name!r} ({update.config.method}) transforms the base layer's input, which "
                                  "cannot differ per example in one forward; mixed batches take additive methods "
                                  "(LoRA on its fast path; DoRA, LoHa, LoKr, VeRA, ... on the generic one).")
    position = {n: k for k, n in enumerate(in_batch)}
    index = torch.tensor([position.get(n, -1) if n is not None else -1 for n in names], dtype=torch.long)
    route = BatchRoute(in_batch, index)
    clear_batch_adapters(model)
    for layer in layers:
        layer.batch_route = route
    route.hook = model.register_forward_pre_hook(route.check_batch, with_kwargs=True)


def clear_batch_adapters(model: nn.Module) -> None:
    """Back to the active adapters for every example."""
    for layer in adapters(model).values():
        if isinstance(layer, AdaptedLayer) and layer.batch_route is not None:
            if getattr(layer.batch_route, "hook", None) is not None:
                layer.batch_route.hook.remove()
                layer.batch_route.hook = None
            layer.batch_route = None


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """Inside the block, example ``i`` of each batch uses adapter ``names[i]`` (None: the base alone); see
    ``set_batch_adapters``. Works for forward, backward and ``generate``."""
    set_batch_adapters(model, names)
    try:
        yield model
    finally:
        clear_batch_adapters(model)
