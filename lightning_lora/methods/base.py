"""The weight-update interface (``WeightUpdate``, ``AdaptedLayer``) and ``MethodSpec``, how a method plugs into surgery.

A weight-update method is one small ``WeightUpdate`` module: its forward adds the method's update to the base output,
``delta_weight`` gives the same update as a change of the weight. ``AdaptedLayer`` sits in the model in place of the
base layer, runs the base computation once and then each unmerged update, and implements merge and unmerge for all
methods. Updates live in an ``nn.ModuleDict`` keyed by adapter name, so several named adapters can share a layer.
Inserted-module methods (``methods/inserted.py``) attach beside a sublayer instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DEFAULT_ADAPTER, AdapterConfig

try:  # transformers' GPT-2 style layer: weight stored as (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the core does not need it
    Conv1D = type("Conv1D", (nn.Module,), {})

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)  # what "all-linear" targets


class MergeError(RuntimeError):
    """A merge that cannot be done; the model is unchanged."""


# -- the base layers an AdaptedLayer can wrap, and how each computes its output ----------------------------------------
def _linear(layer: AdaptedLayer, x: Tensor) -> Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _conv1d_transposed(layer: AdaptedLayer, x: Tensor) -> Tensor:
    return x @ layer.weight if layer.bias is None else torch.addmm(layer.bias, x, layer.weight)


def _conv(layer: AdaptedLayer, x: Tensor) -> Tensor:
    return layer.original_module._conv_forward(x, layer.weight, layer.bias)  # honors padding_mode


def _embedding(layer: AdaptedLayer, x: Tensor) -> Tensor:
    m = layer.original_module
    return F.embedding(x, layer.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


@dataclasses.dataclass(frozen=True)
class BaseKind:
    """How ``AdaptedLayer`` runs one kind of base layer.

    ``family`` ("linear", "conv", "embedding") picks a method's update module. Linear-like layers run on 2-D
    ``(tokens, features)`` input (``flatten``): their output is then a fresh 2-D tensor that backward does not need,
    which a LoRA update can accumulate into in place. ``fan_in_fan_out``: the weight is stored ``(in, out)``.
    """

    family: str
    forward: Callable[[Any, Tensor], Tensor]
    dims: Callable[[nn.Module], tuple[int, int]]  # (in_features, out_features)
    flatten: bool = False
    fan_in_fan_out: bool = False


_CONV = BaseKind("conv", _conv, lambda m: (m.in_channels, m.out_channels))
BASE_KINDS: dict[type, BaseKind] = {
    nn.Linear: BaseKind("linear", _linear, lambda m: (m.in_features, m.out_features), flatten=True),
    Conv1D: BaseKind("linear", _conv1d_transposed, lambda m: tuple(m.weight.shape), flatten=True, fan_in_fan_out=True),
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.Embedding: BaseKind("embedding", _embedding, lambda m: (m.num_embeddings, m.embedding_dim)),
}


def base_kind(module: nn.Module) -> Optional[BaseKind]:
    """The ``BASE_KINDS`` entry of ``module``'s class or nearest base class; None for layers we cannot wrap."""
    return next((BASE_KINDS[cls] for cls in type(module).__mro__ if cls in BASE_KINDS), None)


# quantized weight type -> its dequantization to a plain tensor; filled by ``lightning_lora.quantize``
DEQUANTIZERS: dict[type, Callable[[Tensor], Tensor]] = {}


def dense(weight: Tensor) -> Tensor:
    """``weight`` as a plain tensor: a quantized base weight (``quantize.py``) dequantized, any other as it is."""
    dequantize = DEQUANTIZERS.get(type(weight))
    return weight if dequantize is None else dequantize(weight)


def linear_weight(weight: Tensor, kind: BaseKind) -> Tensor:
    """``weight`` in ``(out_features, in_features)`` layout, as ``F.linear`` reads it."""
    return weight.T if kind.fan_in_fan_out else weight


# -- one method's trainable part on one layer ------------------------------------------------------------------------
class WeightUpdate(nn.Module):
    """The interface of a weight-update method: ``forward(layer, x, out)`` returns ``out`` (the base output, possibly
    with other updates added) plus this update, without building the full delta where it need not; ``delta_weight``
    is the same update as a change of the weight, in ``linear_weight`` layout (the layer's weight layout for convolutions
    and embeddings). ``merged`` is set by ``AdaptedLayer``.

    Multiplicative updates (OFT, BOFT, HRA: ``W R``) act on the input side: with ``transforms_input`` set, the layer
    runs the base op on ``transform_input(layer, x)`` (the input rotated, never a rotated copy of the weight) and
    ``forward`` then only adds what acts on the output side (BOFT's scale), or returns ``out`` as it is."""

    transforms_input: bool = False  # a class attribute: the layer calls transform_input only for such updates

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.merged = False

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError

    def transform_input(self, layer: AdaptedLayer, x: Tensor) -> Tensor:
        """The input the base op sees while this update is unmerged (only called when ``transforms_input``)."""
        raise NotImplementedError

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """Merged weight minus unmerged weight; valid whether merged or not."""
        raise NotImplementedError

    @classmethod
    def decode_plan(cls, updates: list[WeightUpdate]) -> Optional[Callable[[AdaptedLayer, Tensor], Optional[Tensor]]]:
        """A faster forward of an ``nn.Linear`` layer without autograd while ``updates`` (active, unmerged, this
        class's first) are all it applies, or None (the default). ``AdaptedLayer`` keeps it with ``_plain_state``;
        it returns None on a call it cannot take, which then runs the general path. LoRA's skips the per-update module
        calls that dominate batch-1 decoding (``LoRADecodePlan``)."""
        return None

    def before_merge(self, layer: AdaptedLayer) -> None:
        """Keep what ``delta_weight`` needs once the weight holds the merged value."""

    def after_unmerge(self, layer: AdaptedLayer) -> None:
        """Drop what ``before_merge`` kept."""

    def shared_tensors(self) -> dict[str, Tensor]:
        """Tensors every layer of this adapter shares (the same objects), by name: an adapter file stores them once, as
        ``base_model.<name>`` (where PEFT keeps a tuner's shared state). None by default."""
        return {}

    def after_base_replaced(self, layer: AdaptedLayer) -> None:
        """The layer's base weight was replaced by an approximation of itself (``quantize_base``): re-derive what an
        untrained update took from the old one. A trained or loaded update is left as it is."""

    def on_attach(self, layer: AdaptedLayer) -> None:
        """The layer was just put into the model (``surgery.attach``): an update that moves part of the base into
        itself (PiSSA/OLoRA) changes the base weight here, never while the model is only being prepared."""

    def on_detach(self, layer: AdaptedLayer) -> None:
        """The update is leaving the model for good (``unload``, ``delete_adapter``; never a temporary unwrap): undo
        what ``on_attach`` did to the base weight."""

    def base_shift(self, layer: AdaptedLayer) -> Optional[Tensor]:
        """What ``on_attach`` added to the base weight, in ``delta_weight``'s layout, or None: a merge into another
        copy of the original base (``merge_quantized``'s ``original`` target) adds it too."""
        return None

    def file_tensors(self) -> dict[str, Tensor]:
        """This update's tensors as an adapter file holds them, named relative to the update: its parameters and
        persistent buffers. A method whose state is not the file's form (PiSSA's init offset, AdaLoRA's pruned ranks
        and importance statistics) converts here; an update built from the file's own config must give back its own
        tensors, which ``load_adapter`` copies into."""
        return self.state_dict(keep_vars=True)


# weights up to this size keep their exact base copy on their own device while merged; larger ones on the CPU
EXACT_BASE_ON_DEVICE_BYTES = 16 * 2**20


def keep_exact(weight: Tensor) -> Tensor:
    """A copy of ``weight`` bit for bit, on the CPU when it is large and on an accelerator (pinned when CUDA's)."""
    weight = weight.detach()
    if weight.device.type == "cpu" or weight.numel() * weight.element_size() <= EXACT_BASE_ON_DEVICE_BYTES:
        return weight.clone()
    copy = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=weight.device.type == "cuda")
    return copy.copy_(weight)


class _WithWeight:
    """A layer as the base ops read it (``weight``, ``bias``, ``original_module``), with another weight."""

    def __init__(self, layer: AdaptedLayer, weight: Tensor) -> None:
        self.weight, self.bias, self.original_module = weight, layer.bias, layer.original_module


_PLAIN_INPUTS = frozenset({"enabled", "active_adapters", "batch_route", "exact_base", "base_op"})  # see _plain_state


class Updates(nn.ModuleDict):
    """A layer's updates by name, knowing whether any of them transforms the input (so that the forward of a layer
    without such an update, LoRA's, pays one attribute read for the hook, not a loop), and counting its changes (an
    update added, replaced or removed: ``AdaptedLayer`` then recomputes its ``_plain_state``)."""

    transforms_input = False
    changes = 0

    def __setitem__(self, key: str, module: nn.Module) -> None:
        super().__setitem__(key, module)
        self.transforms_input = any(getattr(u, "transforms_input", False) for u in self.values())
        self.changes += 1

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.transforms_input = any(getattr(u, "transforms_input", False) for u in self.values())
        self.changes += 1


class AdaptedLayer(nn.Module):
    """A base layer with weight updates, in the model in place of that layer.

    It takes over the base layer's ``weight`` and ``bias`` (the same ``Parameter`` objects), so the model's state dict
    keeps the base's key names and tied weights stay tied; the original module is kept aside (outside the module tree)
    and handed back by ``unwrap``. Updates are in ``adapters`` by name: their tensors are named
    ``<path>.adapters.<name>.<tensor>`` in the model's state dict.
    """

    def __init__(self, base_layer: nn.Module, update: WeightUpdate, name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        kind = base_kind(base_layer)
        if kind is None:
            raise TypeError(f"{type(base_layer).__name__} is not a layer weight updates can wrap")
        object.__setattr__(self, "original_module", base_layer)  # kept out of the module tree on purpose
        self.weight = base_layer.weight
        self.register_parameter("bias", getattr(base_layer, "bias", None))
        self.base_op = kind.forward
        self.flatten = kind.flatten
        self.kind = kind
        self.adapters = Updates({name: update})
        # the unmerged updates forward applies, in this order; None: all of them (``surgery.set_active_adapters``)
        self.active_adapters: Optional[tuple[str, ...]] = None
        self.enabled = True
        # the base weight bit for bit while adapters are merged into ``weight`` (see ``keep_exact``); None otherwise
        self.exact_base: Optional[Tensor] = None
        # set by ``lightning_lora.mixed``: applies each example's own adapter instead of ``active_adapters``
        self.batch_route: Optional[Callable[[AdaptedLayer, Tensor, Tensor], Tensor]] = None

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():  # compiled, this check would only add guards; the graph is the same
            plain = self.__dict__.get("_plain")
            if plain is None or plain[1] != self._modules["adapters"].changes:
                plain = self._plain_state()
            if plain[0]:  # every active adapter merged, or all off: the base op alone, as the base layer runs it
                return F.linear(x, self.weight, self.bias)
            if plain[2] is not None and not torch.is_grad_enabled():
                out = plain[2](self, x)
                if out is not None:
                    return out
        return self._run(x, self.enabled)

    def _plain_state(self) -> tuple[bool, int, Optional[Callable[[AdaptedLayer, Tensor], Optional[Tensor]]]]:
        """Whether ``forward`` is exactly ``F.linear`` on ``weight`` (an ``nn.Linear`` base whose active adapters are
        all merged, or disabled with nothing merged), the ``Updates.changes`` it was computed for, and the active
        updates' ``decode_plan`` (None: none); kept until an attribute it reads is set (``__setattr__``), a merge
        changes, or an adapter is added, replaced or removed."""
        plan = None
        if self.enabled and self.batch_route is not None:  # per-example adapters: the route's own plan, if any
            plain = False
            plan = getattr(self.batch_route, "decode_plan", None) if self.base_op is _linear else None
        elif self.enabled:
            pending = [self.adapters[n] for n in self.active_names() if n in self.adapters]
            pending = [u for u in pending if not u.merged]
            plain = not pending
            if pending and self.base_op is _linear and not self.adapters.transforms_input:
                plan = type(pending[0]).decode_plan(pending)
        else:
            plain = self.exact_base is None
        state = (plain and self.base_op is _linear, self.adapters.changes, plan)
        self.__dict__["_plain"] = state
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _PLAIN_INPUTS:
            self.__dict__.pop("_plain", None)

    def base_forward(self, x: Tensor) -> Tensor:
        """The base layer's output without any update: with the exact base weight when adapters are merged."""
        return self._run(x, False)

    def _run(self, x: Tensor, adapted: bool) -> Tensor:
        shape = x.shape
        if self.flatten:
            x = x.reshape(-1, shape[-1])
        if adapted or self.exact_base is None:
            # _modules, not nn.Module.__getattr__: LoRA's forward pays one dict lookup for the input-transform hook
            transform = adapted and self._modules["adapters"].transforms_input
            out = self.base_op(self, self._base_input(x) if transform else x)
        else:  # the base alone over a merged weight: run the kept base instead of unmerging and merging again
            out = self.base_op(_WithWeight(self, self.exact_base.to(self.weight.device, non_blocking=True)), x)
        if adapted:
            if self.batch_route is not None:
                out = self.batch_route(self, x, out)
            else:
                for name in self.active_names():
                    update = self.adapters[name] if name in self.adapters else None
                    if update is not None and not update.merged:
                        out = update(self, x, out)
        return out.view(*shape[:-1], out.shape[-1]) if self.flatten else out

    def active_names(self) -> Iterable[str]:
        """The names ``forward`` applies, in order (some may be adapters of other layers only)."""
        return self.adapters if self.active_adapters is None else self.active_adapters

    def _base_input(self, x: Tensor) -> Tensor:
        """``x`` as the base op sees it with the active unmerged input-transforming updates (multiplicative methods).
        Several combine as ``x + sum_i (T_i(x) - x)``, the input side of the merged weight ``W + sum_i dW_i``, so
        merging any of them leaves the outputs as they were (chaining them would not)."""
        if self.batch_route is not None:
            return x
        moved = [update.transform_input(self, x) for update in (
            self.adapters[n] for n in self.active_names() if n in self.adapters)
            if update.transforms_input and not update.merged]
        if len(moved) < 2:
            return moved[0] if moved else x
        return x + sum(m - x for m in moved)

    @property
    def config(self) -> AdapterConfig:
        """The config of the layer's first adapter."""
        return next(iter(self.adapters.values())).config

    @property
    def merged(self) -> bool:
        """Whether any adapter is folded into the weight."""
        return any(u.merged for u in self.adapters.values())

    def linear_weight(self) -> Tensor:
        """The weight in ``(out_features, in_features)`` layout (transposed for ``Conv1D``)."""
        return linear_weight(dense(self.weight), self.kind)

    # -- merge algebra, written once for every weight-update method ------------------------------------------------
    # The weight is always a function of the kept exact base and the set of merged adapters: base + their deltas,
    # summed in float32 and rounded once. Unmerging writes the kept base back, so any sequence of merges, unmerges
    # and switches leaves the base bit for bit (subtracting a delta again would round: issue 12).
    def delta_weight(self, name: str = DEFAULT_ADAPTER) -> Tensor:
        """Adapter ``name``'s update in the layout of ``weight``, relative to the base (also while merged)."""
        with self._at_base():
            return linear_weight(self.adapters[name].delta_weight(self), self.kind)

    def base_weight(self) -> Tensor:
        """The base weight, exact: the kept copy while adapters are merged (on the weight's device)."""
        weight = self.weight.detach() if self.exact_base is None else self.exact_base.to(self.weight.device)
        return dense(weight)

    def merged_weight(self) -> Tensor:
        """The weight the adapted forward computes with: the merged adapters and the unmerged active ones folded in,
        computed out of place (the model is not changed)."""
        pending = [n for n in self.active_names() if n in self.adapters and not self.adapters[n].merged]
        if not pending:
            return self.weight.detach()
        done = [n for n, u in self.adapters.items() if u.merged]
        with torch.no_grad():
            total = self.base_weight().float() + sum(self.delta_weight(n).float() for n in done + pending)
        return total.to(self.weight.dtype)

    def unmerged_weight(self) -> Tensor:
        """The weight with every merged adapter taken out again: the base, bit for bit."""
        return self.base_weight()

    def check_mergeable(self) -> None:
        if not torch.isfinite(self.merged_weight()).all():
            raise MergeError("merging would put inf/NaN into the weight; the adapter weights have diverged")

    def merge(self, names: Optional[Iterable[str]] = None) -> None:
        """Fold adapters ``names`` (default: all) into the weight; merged ones are skipped."""
        names = list(self.adapters) if names is None else list(names)
        if all(self.adapters[n].merged for n in names):
            return
        if type(self.weight) in DEQUANTIZERS:
            raise MergeError("the base weight is quantized, so a merge in place would round the update away; use "
                             "lightning_lora.quantize.merge_quantized(model, target=...) to choose what to merge into")
        self.set_merged([n for n, u in self.adapters.items() if u.merged or n in names])

    def unmerge(self, names: Optional[Iterable[str]] = None) -> None:
        """Take adapters ``names`` (default: all merged ones) out of the weight again, exactly."""
        names = list(self.adapters) if names is None else list(names)
        if any(self.adapters[n].merged for n in names):
            self.set_merged([n for n, u in self.adapters.items() if u.merged and n not in names])

    def set_merged(self, names: list[str]) -> None:
        """Make the weight hold the base plus exactly adapters ``names``: the base written back from the kept copy,
        every delta computed against it, summed in float32 and rounded once."""
        self.__dict__.pop("_plain", None)
        with torch.no_grad():
            if self.exact_base is None:
                if not names:
                    return
                self.exact_base = keep_exact(self.weight)
            else:
                self.weight.copy_(self.exact_base)
                for update in self.adapters.values():
                    if update.merged:
                        update.merged = False
                        update.after_unmerge(self)
            if not names:
                self.exact_base = None
                return
            deltas = [self.delta_weight(n).float() for n in names]
            for name in names:
                self.adapters[name].before_merge(self)
            self.weight.copy_((self.weight.float() + sum(deltas)).to(self.weight.dtype))
            for name in names:
                self.adapters[name].merged = True

    @contextlib.contextmanager
    def _at_base(self) -> Iterator[None]:
        """While adapters are merged: the weight holds the base and no update counts as merged inside the block (a
        method's delta may read the base weight, as DoRA's norm does)."""
        merged = [u for u in self.adapters.values() if u.merged]
        if self.exact_base is None or not merged:
            yield
            return
        current = self.weight.detach().clone()
        with torch.no_grad():
            self.weight.copy_(self.exact_base)
        for update in merged:
            update.merged = False
        try:
            yield
        finally:
            with torch.no_grad():
                self.weight.copy_(current)
            for update in merged:
                update.merged = True

    # -- what belongs to the adapters ------------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, Tensor]:
        """Adapter parameters and persistent buffers, named relative to the layer (``adapters.<name>.<tensor>``)."""
        return {f"adapters.{n}": t for n, t in self.adapters.state_dict(keep_vars=True).items()}

    def base_shift(self) -> Optional[Tensor]:
        """What the updates' ``on_attach`` added to the base weight, in the layout of ``weight`` (None: nothing)."""
        shifts = [shift for u in self.adapters.values() if (shift := u.base_shift(self)) is not None]
        return linear_weight(sum(shifts), self.kind) if shifts else None

    def file_tensors(self) -> dict[str, Tensor]:
        """``adapter_tensors`` as an adapter file holds them (``WeightUpdate.file_tensors``)."""
        return {f"adapters.{n}.{k}": t for n, u in self.adapters.items() for k, t in u.file_tensors().items()}

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        return self.adapters.parameters()

    def unwrap(self) -> nn.Module:
        """The original module, holding this layer's current weight and bias."""
        base = self.original_module
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        return base

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> AdaptedLayer:
        """``nn.Module._apply`` (``.to``, ``.cpu``, ...) swaps tensor-subclass parameters in place, which fails once
        ``torch.compile`` holds a weak reference to them; a quantized base weight (frozen, in no optimizer) is replaced
        by a new Parameter instead. A dtype cast dequantizes it (as torchao's ``.to(dtype)`` does): the plain base op
        then runs again."""
        weight = self._parameters.get("weight")
        if type(weight) not in DEQUANTIZERS:
            return super()._apply(fn, recurse)
        del self._parameters["weight"]
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        with torch.no_grad():
            moved = nn.Parameter(fn(weight), requires_grad=False)
        self.weight = self.original_module.weight = moved
        if type(moved) not in DEQUANTIZERS:
            self.base_op = self.kind.forward
        return self

    def extra_repr(self) -> str:
        return f"base={type(self.original_module).__name__}, merged={self.merged}, enabled={self.enabled}"


def adapter_prefix(name: str = DEFAULT_ADAPTER) -> str:
    """How an ``AdaptedLayer``'s tensors of adapter ``name`` start; PEFT's saved names omit it."""
    return f"adapters.{name}."


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How one method plugs into surgery: which layers it can adapt, how to build it for one of them, and (for
    inserted methods) where it goes when the user names no targets.

    A weight-update method's ``build`` returns its ``WeightUpdate`` (surgery wraps it in an ``AdaptedLayer``); an
    inserted method's returns its ``InsertedAdapter``. The table of methods is ``methods.registry.METHODS``.
    """

    name: str
    build: Callable[[nn.Module, AdapterConfig, str], nn.Module]
    is_supported: Callable[[nn.Module], bool]
    mergeable: bool
    default_targets: Optional[Callable[[nn.Module, AdapterConfig], list[str]]] = None
    # replaces target resolution for methods that choose their own places from the model and their options (prompt
    # and prefix tuning: the whole model, path ""; LLaMA-Adapter: the top adapter_layers attention modules)
    find_targets: Optional[Callable[[nn.Module, AdapterConfig], list[str]]] = None
    # Training-loop hooks (the callback calls them, knowing nothing of the method), given the adapters by path:
    # ``regularization`` returns a loss term whose gradient is added at each optimizer step (after AMP unscaling), or
    # None; ``after_step(adapters, step, planned_steps)`` runs after each optimizer step (``step`` counts from 0) while
    # gradients still exist; ``planned_steps`` is the run's estimated number of optimizer steps (may be inf).
    regularization: Optional[Callable[[dict[str, nn.Module]], Optional[Tensor]]] = None
    after_step: Optional[Callable[[dict[str, nn.Module], int, float], None]] = None
    # builds, once per adapter from all its target modules, what every layer of it shares (VeRA's random projections);
    # ``build`` then gets it as the keyword argument ``shared``
    shared: Optional[Callable[[list[nn.Module], AdapterConfig], nn.Module]] = None
