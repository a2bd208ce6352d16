"""The two adapter interfaces: ``AdaptedLayer`` (weight-update methods) and ``InsertedAdapter`` (inserted modules).

A weight-update method is one small ``WeightUpdate`` module: its forward adds the method's update to the base output,
``delta_weight`` gives the same update as a change of the weight. ``AdaptedLayer`` sits in the model in place of the
base layer, runs the base computation once and then each unmerged update, and implements merge and unmerge for all
methods. Updates live in an ``nn.ModuleDict`` keyed by adapter name, so several named adapters can share a layer.
Inserted-module methods attach beside a sublayer and cannot merge.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fingerprint
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
    and embeddings). ``merged`` is set by ``AdaptedLayer``."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.merged = False

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        """Merged weight minus unmerged weight; valid whether merged or not."""
        raise NotImplementedError

    def before_merge(self, layer: AdaptedLayer) -> None:
        """Keep what ``delta_weight`` needs once the weight holds the merged value."""

    def after_unmerge(self, layer: AdaptedLayer) -> None:
        """Drop what ``before_merge`` kept."""

    def after_base_replaced(self, layer: AdaptedLayer) -> None:
        """The layer's base weight was replaced by an approximation of itself (``quantize_base``): re-derive what an
        untrained update took from the old one. A trained or loaded update is left as it is."""


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
        self.adapters = nn.ModuleDict({name: update})
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, self.enabled)

    def base_forward(self, x: Tensor) -> Tensor:
        """The base layer's output with the current weight, without unmerged updates."""
        return self._run(x, False)

    def _run(self, x: Tensor, adapted: bool) -> Tensor:
        shape = x.shape
        if self.flatten:
            x = x.reshape(-1, shape[-1])
        out = self.base_op(self, x)
        if adapted:
            for update in self.adapters.values():
                if not update.merged:
                    out = update(self, x, out)
        return out.view(*shape[:-1], out.shape[-1]) if self.flatten else out

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
    def delta_weight(self, name: str = DEFAULT_ADAPTER) -> Tensor:
        """Adapter ``name``'s update in the layout of ``weight``."""
        return linear_weight(self.adapters[name].delta_weight(self), self.kind)

    def merged_weight(self) -> Tensor:
        """The weight with every unmerged adapter folded in, computed out of place (the model is not changed)."""
        pending = [n for n, u in self.adapters.items() if not u.merged]
        if not pending:
            return self.weight.detach()
        with torch.no_grad():
            total = dense(self.weight).float() + sum(self.delta_weight(n).float() for n in pending)
        return total.to(self.weight.dtype)

    def unmerged_weight(self) -> Tensor:
        """The weight with every merged adapter taken out again, computed out of place (equal to the base up to
        rounding)."""
        done = [n for n, u in self.adapters.items() if u.merged]
        with torch.no_grad():
            total = self.weight.float() - sum(self.delta_weight(n).float() for n in done) if done else self.weight
        return total.to(self.weight.dtype)

    def check_mergeable(self) -> None:
        if not torch.isfinite(self.merged_weight()).all():
            raise MergeError("merging would put inf/NaN into the weight; the adapter weights have diverged")

    def merge(self, names: Optional[Iterable[str]] = None) -> None:
        """Fold adapters ``names`` (default: all) into the weight; merged ones are skipped."""
        names = list(self.adapters) if names is None else list(names)
        if type(self.weight) in DEQUANTIZERS and any(not self.adapters[n].merged for n in names):
            raise MergeError("the base weight is quantized, so a merge in place would round the update away; use "
                             "lightning_lora.quantize.merge_quantized(model, target=...) to choose what to merge into")
        for name in names:
            update = self.adapters[name]
            if update.merged:
                continue
            if not self.merged:
                fingerprint.remember_base(self.weight)  # the exact base, for base fingerprints (merging rounds)
            with torch.no_grad():
                new_weight = (self.weight.float() + self.delta_weight(name).float()).to(self.weight.dtype)
                update.before_merge(self)
                self.weight.copy_(new_weight)
            update.merged = True
            fingerprint.note_written(self.weight)

    def unmerge(self, names: Optional[Iterable[str]] = None) -> None:
        """Take adapters ``names`` (default: all merged ones) out of the weight again."""
        for name in reversed(list(self.adapters)) if names is None else names:
            update = self.adapters[name]
            if not update.merged:
                continue
            with torch.no_grad():
                delta = self.delta_weight(name).float()
                self.weight.copy_((self.weight.float() - delta).to(self.weight.dtype))
            update.merged = False
            update.after_unmerge(self)
            fingerprint.note_written(self.weight)

    # -- what belongs to the adapters ------------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, Tensor]:
        """Adapter parameters and persistent buffers, named relative to the layer (``adapters.<name>.<tensor>``)."""
        return {f"adapters.{n}": t for n, t in self.adapters.state_dict(keep_vars=True).items()}

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


class InsertedAdapter(nn.Module):
    """An inserted-module adapter: attached as a child of one sublayer, it rewrites the output of that sublayer (or of
    the module inside it that ``hooked_module`` names) through a forward hook. It never touches base weights and
    cannot merge."""

    attach_name = "adapter"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_hook", None)
        self.enabled = True

    def hooked_module(self, sublayer: nn.Module) -> nn.Module:
        """The module whose output the adapter rewrites: the sublayer itself unless a method places it elsewhere."""
        return sublayer

    def attach(self, sublayer: nn.Module) -> None:
        sublayer.add_module(self.attach_name, self)
        # first among the module's hooks, so that others (transformers records hidden states with hooks) see our output
        hook = self.hooked_module(sublayer).register_forward_hook(self._rewrite_if_enabled, prepend=True)
        object.__setattr__(self, "_hook", hook)

    def detach(self, sublayer: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            object.__setattr__(self, "_hook", None)
        delattr(sublayer, self.attach_name)

    def _rewrite_if_enabled(self, module: nn.Module, args: Any, output: Any) -> Any:
        return self.rewrite_output(module, args, output) if self.enabled else output

    def rewrite_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        """The hooked module's new output: this adapter applied to the output (the first element of a tuple)."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)

    def adapter_tensors(self) -> dict[str, Tensor]:
        return {f"{self.attach_name}.{n}": t for n, t in self.state_dict(keep_vars=True).items()}

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()
