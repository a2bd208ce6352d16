"""Mixed-adapter batches: each example of a batch names its adapter (or none), and one forward applies each
example's own update, in training as in inference and ``generate``, without a loop over the batch.

On each adapted layer the LoRA factors of the adapters it holds are concatenated along the rank,
``A = [A_1; ...; A_n]`` and ``B = [B_1 ... B_n]``, and a per-example mask keeps each example's own rank columns times
its scaling: ``out += ((x A^T) * mask) B^T``. That is the kernels of one LoRA and one multiply; the rank is wider, but
these skinny GEMMs are bound by reading the activations, so the GPU time is that of a single-adapter batch. Gradients
reach each adapter only through its own examples' columns, so every adapter gets exactly the gradient of its own
examples. (A per-example gather of the factors with batched GEMMs, tried first, cost 2.5x a single-adapter forward on
an H200 at 1B shapes: about 30 small kernels per layer.) Other weight-update methods take a generic path (each
adapter's update computed on the whole batch and kept on its rows: one update pass per adapter of the batch); methods
that transform the base layer's input (OFT, BOFT, HRA) cannot mix.

What made a mixed batch cost more than a single adapter's was host time, not GPU time (an H100 profile at 1B shapes:
the same GPU time, twice the wall time): ``set_batch_adapters`` does everything that does not depend on the input
once per batch (one walk over the model that does not enter the adapted layers; each layer's ``LayerRoute``; the
masks, once per rank layout; what depends only on a layer's adapters is kept on the layer between batches), so a
layer's forward is three tensor calls and no bookkeeping.

The shapes depend on the adapters a layer holds, never on the batch: an adapter absent from the batch keeps its
columns in the concatenation with zeros in the mask, and the mix is only in tensors, so a compiled model (regional or
whole) does not recompile when the mix changes, and a serving layer keeps one concatenation of its factors across
batches. The price: a layer's mixed pass runs at the summed rank of all its LoRA adapters, so unload the adapters
that are not served. In training, an adapter absent from the batch takes part detached, so its gradient is None (an
optimizer skips it, as it would in separate per-adapter runs), not zero (which AdamW would decay and step with its
momentum); a compiled training graph is therefore one per set of adapters met in a batch (at most 2^n - 1).

Rows are mapped to examples batch-major: a layer input of shape (batch * k, ...) or (batch, ...) (also a 2-D
(tokens, features) one, flattened from (batch, seq, features)) gives example ``i`` its ``i``-th slice, which is also
what ``generate`` does when it repeats examples for beams or several sequences per prompt.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError
from .methods.base import AdaptedLayer, WeightUpdate
from .methods._dropout import dropout_linear
from .methods.lora import LoRAUpdate
from .surgery import check_names

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names; None means the same


class BatchRoute:
    """One batch of per-example adapters on a model: its size, the layers given a ``LayerRoute`` for it, and the
    model's pre-hook that checks each input against the size."""

    def __init__(self, batch: int, layers: list[AdaptedLayer]) -> None:
        self.batch = batch
        self.layers = layers
        self.hook: Optional[torch.utils.hooks.RemovableHandle] = None

    def check_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pre-hook on the model: its input's batch must be the examples named (or a multiple of them, as
        ``generate`` repeats each example for beams)."""
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0), None)
        if first is not None and first.shape[0] % self.batch:
            raise ConfigError(
                f"{type(module).__name__} got a batch of {first.shape[0]} examples, but per-example adapters were "
                f"given for {self.batch}; give one adapter name (or None) per example of the batch."
            )


class _Mask:
    """The mask of one rank layout (the LoRA adapters a layer holds, in order): each example's own adapter's rank
    columns hold its scaling, the others zero. Built once per batch and layout, (batch, 1, R) in float32 on the
    factors' device, and shared by the layers of that layout, which read it expanded to their rows and cast
    (``rows``): made once per row count and dtype, so each layer's forward multiplies by it in place, one kernel."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask
        self._rows: dict[tuple[int, torch.dtype], Tensor] = {}

    def rows(self, count: int, dtype: torch.dtype) -> Tensor:
        """(count, R): each row's columns, rows batch-major (each example's repeated ``count / batch`` times)."""
        compiling = torch.compiler.is_compiling()  # compiled, the expand and cast fuse into the multiply
        rows = None if compiling else self._rows.get((count, dtype))
        if rows is None:
            batch, _, rank = self.mask.shape
            rows = self.mask.to(dtype).expand(batch, count // batch, rank).reshape(count, rank)
            if not compiling:
                if len(self._rows) > 4:  # generate without a KV cache: a new row count each step
                    self._rows.clear()
                self._rows[count, dtype] = rows
        return rows


class LayerRoute:
    """``AdaptedLayer.batch_route`` of one layer for one batch: everything its forward needs that does not depend on
    the input, computed when the batch is set, so that a forward runs no per-layer bookkeeping.

    Its shapes depend on the adapters the layer holds, never on the batch's mix: every LoRA adapter of the layer is
    in the concatenated factors (an adapter absent from the batch gets zero mask columns), and the mix lives only in
    tensors (the masks), so a compiled model does not recompile when the mix changes, and a serving layer keeps its
    concatenated factors across batches. (In training, the adapters absent from the batch are detached, which a
    compiled graph guards on: it compiles once per set of adapters met in a batch, never per assignment of them.)"""

    def __init__(self, batch: int, layout: _Layout, in_batch: set[str]) -> None:
        self.batch = batch
        self.lora = layout.lora  # the layer's LoRA adapters (fast path), in the layer's order
        # (nn.Module.__getattr__ would cost more than the rest of this, over a 1B model's 112 layers)
        try:
            self.a = tuple([u._modules["lora_A"]._parameters["weight"] for u in self.lora])
            self.b = tuple([u._modules["lora_B"]._parameters["weight"] for u in self.lora])
        except KeyError:  # computed (torch.nn.utils.parametrize): read once per batch
            self.a = tuple([u.lora_A.weight for u in self.lora])
            self.b = tuple([u.lora_B.weight for u in self.lora])
        # With autograd, an adapter absent from the batch takes part detached: its gradient stays None, not zero, so
        # an optimizer leaves it alone (no weight decay or momentum step), as separate per-adapter runs would.
        self.a_grad, self.b_grad = self.a, self.b
        if not in_batch.issuperset(layout.names):
            present = [n in in_batch for n in layout.names]
            self.a_grad = tuple([t if p else t.detach() for t, p in zip(self.a, present)])
            self.b_grad = tuple([t if p else t.detach() for t, p in zip(self.b, present)])
        self.key = layout.key
        self.trainable = any([t.requires_grad for t in self.a_grad + self.b_grad])
        self.device = self.a[0].device if self.a else None
        self.dropout = layout.dropout  # the one dropout probability of all of ``lora`` (0: none); None: they differ
        # set by ``set_batch_adapters`` from the batch: the mask of ``lora``'s rank columns; where the dropouts
        # differ, each example's keep probability (batch, 1, 1); any other additive update, with its examples as a
        # (batch, 1) float32 row selector and whether it is in the batch; the batch's route
        self.mask: Optional[_Mask] = None
        self.keep: Optional[Tensor] = None
        self.others: tuple[tuple[WeightUpdate, Tensor, bool], ...] = ()
        self.owner: Optional[BatchRoute] = None

    def __call__(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        if x.shape[0] % self.batch:
            raise ConfigError(
                f"A layer got {x.shape[0]} rows for a batch of {self.batch} examples with per-example adapters; the "
                "rows must be the examples, batch-major (each repeated equally). Give one adapter name per example "
                "of the batch."
            )
        for update, rows, present in self.others:  # each its update on every row, kept on its own rows
            if torch.compiler.is_compiling() or present:  # compiled: every update, so that one graph fits every mix
                delta = update(layer, x, out.clone()) - out
                out = out + (delta.reshape(self.batch, -1) * rows.to(out.dtype)).view(out.shape)
        if self.lora:
            out = self._lora_rows(layer, x, out)
        return out

    def decode_plan(self, layer: AdaptedLayer, x: Tensor) -> Optional[Tensor]:
        """The layer's whole forward without autograd, which ``AdaptedLayer._plain_state`` takes as its decode plan
        for an ``nn.Linear`` base: the base ``linear`` and this route, without the general path's bookkeeping. None
        (the general path) for a generic update or dropout in training."""
        if self.others or (self.dropout != 0 and layer.training):
            return None
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        try:
            weight, bias = layer._parameters["weight"], layer._parameters["bias"]
        except KeyError:  # computed (torch.nn.utils.parametrize)
            weight, bias = layer.weight, layer.bias
        out = self(layer, x, F.linear(x, weight, bias))
        return out.view(*shape[:-1], out.shape[-1])

    def _lora_rows(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out`` plus each example's own LoRA update, in the kernels of a single LoRA and one multiply: ``x``
        through the layer's LoRA adapters' A concatenated along the rank, times the mask that keeps each row's
        adapter's rank columns (its scaling folded in; zeros for none), then through their B concatenated, accumulated
        into ``out`` by the GEMM. The wider rank costs little: these skinny GEMMs are bound by reading ``x``."""
        a, b_t = _factors(layer, self, out.dtype)
        # in place: the GEMM's backward does not need its output; F.linear: A's gradient comes out in A's layout, so
        # each adapter's slice of it becomes that adapter's .grad without a copy
        if self.dropout and layer.training:  # one probability: backward keeps x and the mask as bits, no dropped copy
            hidden = dropout_linear(x, a, self.dropout)
        else:
            hidden = F.linear(_dropout(x, self) if self.dropout != 0 and layer.training else x, a)
        hidden = hidden.mul_(self.mask.rows(x.shape[0], out.dtype))
        return out.addmm_(hidden, b_t)


def _factors(layer: AdaptedLayer, route: LayerRoute, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The layer's LoRA factors, concatenated along the rank and cast: A (R, in) and B^T (R, out). Without autograd
    (serving) they are kept on the layer until a factor changes (an optimizer step, a hot-swap, a load: each bumps
    the tensor's version) or moves, so that a forward runs three kernels per layer (a single LoRA: two)."""
    grad = torch.is_grad_enabled()
    cache = not (grad and route.trainable) and not torch.compiler.is_compiling()
    if cache:
        stamp = (route.key, dtype, [(t.data_ptr(), t._version) for t in route.a + route.b])
        cached = layer.__dict__.get("_mixed_factors")
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
    a_parts, b_parts = (route.a_grad, route.b_grad) if grad else (route.a, route.b)
    if len(a_parts) == 1:
        a, b = a_parts[0].to(dtype), b_parts[0].to(dtype)
    else:  # cast after the concatenation: one cast kernel per factor, not one per adapter
        a, b = torch.cat(a_parts).to(dtype), torch.cat(b_parts, dim=1).to(dtype)
    if cache:
        layer.__dict__["_mixed_factors"] = (stamp, a.detach(), b.detach().t())  # a few MiB at most per layer
    return a, b.t()


def _dropout(x: Tensor, route: LayerRoute) -> Tensor:
    """Each row's adapter's dropout on its input (one draw per row: a row meets one adapter only)."""
    if route.dropout is not None:
        return F.dropout(x, route.dropout, training=True)
    keep = route.keep.to(x.dtype)
    view = x.view(route.batch, -1, x.shape[-1])
    return (view * torch.bernoulli(keep.expand_as(view)) / keep).view(x.shape)


def _dropout_p(update: LoRAUpdate) -> float:
    return update.lora_dropout.p if isinstance(update.lora_dropout, nn.Dropout) else 0.0


class _Layout:
    """What a layer's mixed forward takes from the adapters it holds, whatever the batch: its LoRA adapters (the fast
    path) in the layer's order, their rank columns and dropouts, and any other additive update. Kept on the layer
    until its adapters change (added, removed, replaced, merged or unmerged: ``_layout``'s key)."""

    def __init__(self, layer: AdaptedLayer) -> None:
        mixable = [(n, u) for n, u in layer._modules["adapters"].items()
                   if not u.merged and not getattr(u, "transforms_input", False)]
        fast = [(n, u) for n, u in mixable if type(u) is LoRAUpdate and layer.kind.family == "linear"]
        self.lora = tuple(u for _, u in fast)
        self.key = tuple(id(u) for u in self.lora)
        self.columns = tuple((n, u.r, u.scaling) for n, u in fast)
        self.names = tuple(n for n, _ in fast)
        self.mask_key = repr(self.columns)  # equal across layers of the same layout; a str keeps its hash
        self.dropouts = {n: _dropout_p(u) for n, u in fast}
        ps = set(self.dropouts.values())
        self.dropout = None if len(ps) > 1 else ps.pop() if ps else 0.0  # None: each row its own (``keep``)
        self.others = tuple((n, u) for n, u in mixable if (n, u) not in fast)


def _layout(layer: AdaptedLayer, in_batch: list[str]) -> _Layout:
    """The layer's ``_Layout``; refuses an adapter of the batch that cannot mix (merged, or input-transforming)."""
    updates = layer._modules["adapters"]
    # an update added, replaced or removed bumps ``changes``; while none is merged, ``exact_base`` is None
    key = (id(updates), updates.changes,
           None if layer.exact_base is None else tuple(u.merged for u in updates.values()))
    cached = layer.__dict__.get("_mixed_layout")
    if cached is None or cached[0] != key:
        cached = layer.__dict__["_mixed_layout"] = (key, _Layout(layer))
    for name in in_batch:
        update = updates._modules.get(name)  # (not ModuleDict's Python-level __contains__ and __getitem__)
        if update is None:
            continue
        if update.merged:
            raise ConfigError(f"Adapter {name!r} is merged into the weights, so it would apply to every example; "
                              "unmerge(model) before a mixed-adapter batch.")
        if getattr(update, "transforms_input", False):
            raise ConfigError(f"Adapter {name!r} ({update.config.method}) transforms the base layer's input, which "
                              "cannot differ per example in one forward; mixed batches take additive methods "
                              "(LoRA on its fast path; DoRA, LoHa, LoKr, VeRA, ... on the generic one).")
    return cached[1]


def _adapted_layers(model: nn.Module) -> list[AdaptedLayer]:
    """The model's adapted layers, in ``modules()`` order, without walking the adapters inside them (a mixed batch
    is set once per step: a full walk of a 1B model with 4 adapters visits about ten times as many modules)."""
    found, seen, stack = [], set(), [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, AdaptedLayer):
            found.append(module)
        else:
            stack.extend(m for m in reversed(module._modules.values()) if m is not None)
    return found


def _to(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (built on the CPU) on ``device``. To CUDA from pinned memory without blocking: a copy from pageable
    memory waits for the stream, which would hold the host at every batch until the previous step's kernels ran
    (PyTorch's pinned allocator keeps the source until the copy is done)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def set_batch_adapters(model: nn.Module, names: Sequence[Optional[str]]) -> None:
    """Make each example ``i`` of the following forwards use adapter ``names[i]`` (None or ``"__base__"``: the base
    alone), until ``clear_batch_adapters``. The model is unchanged on error (an unknown name, a merged adapter, a
    method that cannot mix).

    Each adapted layer gets a ``LayerRoute`` holding what its forward needs: the masks are built and copied to the
    device once per batch and rank layout, not once per layer, and what depends only on the layer's adapters is kept
    on the layer between batches."""
    if isinstance(names, str) or not hasattr(names, "__len__") or not len(names):
        raise ConfigError(f"Per-example adapters must be a list with one adapter name (or None) per example, got "
                          f"{names!r}.")
    names = [None if n == BASE else n for n in names]
    in_batch = list(dict.fromkeys(n for n in names if n is not None))
    layers = _adapted_layers(model)
    known = {n for layer in layers for n in layer._modules["adapters"]}
    if any(n not in known for n in in_batch):
        check_names(model, in_batch)  # the error naming the model's adapters
        raise ConfigError(f"Adapters {[n for n in in_batch if n not in known]} adapt no weight (an inserted method: "
                          "prompt, prefix, LLaMA-Adapter ...); mixed batches take weight-update methods.")
    layouts = [_layout(layer, in_batch) for layer in layers]
    batch = len(names)
    made: dict[tuple, object] = {}  # tensors built for this batch, shared by the layers that need the same

    def rows_of(name: str, device: torch.device) -> Tensor:  # (batch, 1): 1 on the rows of adapter ``name``
        if ("rows", name, device) not in made:
            made["rows", name, device] = _to(torch.tensor([[float(n == name)] for n in names]), device)
        return made["rows", name, device]

    def mask_of(layout: _Layout, device: torch.device) -> _Mask:
        key = (layout.mask_key, device)
        if key not in made:  # each adapter's row of columns (and a zero row for none), picked per example
            table = torch.zeros(len(layout.columns) + 1, sum(r for _, r, _ in layout.columns))
            slot, start = {}, 0
            for j, (n, r, scaling) in enumerate(layout.columns):
                table[j, start:start + r], slot[n], start = scaling, j, start + r
            rows = torch.tensor([slot.get(n, len(slot)) for n in names])
            made[key] = _Mask(_to(table[rows].unsqueeze(1), device))
        return made[key]

    def keep_of(layout: _Layout, device: torch.device) -> Tensor:  # (batch, 1, 1): each row's keep probability
        p = layout.dropouts
        if ("keep", tuple(p.items()), device) not in made:
            made["keep", tuple(p.items()), device] = _to(torch.tensor([1 - p.get(n, 0.0) for n in names]),
                                                         device).view(batch, 1, 1)
        return made["keep", tuple(p.items()), device]

    routes, batch_set = [], set(in_batch)
    for layer, layout in zip(layers, layouts):
        route = LayerRoute(batch, layout, batch_set)
        if layout.lora:
            route.mask = mask_of(layout, route.device)
            route.keep = keep_of(layout, route.device) if layout.dropout is None else None
        route.others = tuple((u, rows_of(n, next(u.parameters(), layer.weight).device), n in in_batch)
                             for n, u in layout.others)
        routes.append(route)
    batch_route = BatchRoute(batch, layers)
    _unset(layers)
    for layer, route in zip(layers, routes):
        route.owner = batch_route
        _set_route(layer, route)
    batch_route.hook = model.register_forward_pre_hook(batch_route.check_batch, with_kwargs=True)
    _ROUTES[model] = batch_route


_ROUTES: weakref.WeakKeyDictionary[nn.Module, BatchRoute] = weakref.WeakKeyDictionary()  # model -> its batch


def clear_batch_adapters(model: nn.Module) -> None:
    """Back to the active adapters for every example."""
    route = _ROUTES.get(model)
    # the walk: the batch was set on a module around this one, or on none
    _unset(route.layers if route is not None else _adapted_layers(model))


def _set_route(layer: AdaptedLayer, route: Optional[LayerRoute]) -> None:
    """``layer.batch_route = route`` as ``AdaptedLayer.__setattr__`` does it (dropping the kept ``_plain`` state),
    without ``nn.Module.__setattr__``'s checks: twice per layer and batch, they were a fifth of setting a batch."""
    layer.__dict__["batch_route"] = route
    layer.__dict__.pop("_plain", None)


def _unset(layers: list[AdaptedLayer]) -> None:
    """Take the batch routes off ``layers``, and the batch check off the models they were set on."""
    for layer in layers:
        if isinstance(layer.batch_route, LayerRoute):
            owner = layer.batch_route.owner
            if owner is not None and owner.hook is not None:
                owner.hook.remove()
                owner.hook = None
            _set_route(layer, None)
    for key in [m for m, r in _ROUTES.items() if r.hook is None]:
        del _ROUTES[key]


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """Inside the block, example ``i`` of each batch uses adapter ``names[i]`` (None: the base alone); see
    ``set_batch_adapters``. Works for forward, backward and ``generate``."""
    set_batch_adapters(model, names)
    try:
        yield model
    finally:
        clear_batch_adapters(model)
