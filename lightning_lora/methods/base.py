"""The two adapter interfaces and the registry that maps a method name to its implementation.

Weight-update methods wrap one base layer and can be merged into it; inserted-module methods attach beside a
sublayer and cannot. ``surgery`` and ``io`` are written once against these two interfaces.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig

try:  # transformers' GPT-2 style layer: weight stored as (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the core does not need it
    Conv1D = type("Conv1D", (nn.Module,), {})

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)
CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MergeError(RuntimeError):
    """A merge that cannot be done; the model is unchanged."""


FINGERPRINT_SAMPLES = 16


def _sampled(weight: Tensor, samples: int) -> Tensor:
    flat = weight.detach().reshape(-1)
    count = min(samples, flat.numel())
    # integer arithmetic: a float32 linspace rounds the last index past the end of tensors over 2**24 elements
    index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
    return flat[index]


def _is_plain(weight: Tensor) -> bool:
    return type(weight.data) is torch.Tensor and not weight.is_meta  # not quantized tensor subclasses


def _written(weight: Tensor) -> Optional[Tensor]:
    """The raw sampled values just written, to tell later whether anything else has written the weight since."""
    return _sampled(weight, FINGERPRINT_SAMPLES).cpu() if _is_plain(weight) else None


def weight_sample(weight: Tensor, samples: int = FINGERPRINT_SAMPLES) -> Tensor:
    """``samples`` evenly spaced values of ``weight``, rounded to bfloat16, as float32 on the CPU (base fingerprints)."""
    return _sampled(weight, samples).to(torch.bfloat16).float().cpu()


class WeightAdapter(nn.Module):
    """A weight-update adapter around one base layer.

    It takes over the base layer's ``weight`` and ``bias`` (the same ``Parameter`` objects), so the model's state dict
    keeps the base's key names and tied weights stay tied; the original module is kept aside and handed back by
    ``unwrap``. Subclasses add their trainable tensors and implement ``update`` (the adapter's contribution to the
    output) and ``delta_weight``.
    """

    def __init__(self, base_layer: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        object.__setattr__(self, "original_module", base_layer)  # kept out of the module tree on purpose
        self.weight = base_layer.weight
        self.register_parameter("bias", getattr(base_layer, "bias", None))
        object.__setattr__(self, "config", config)
        self.merged = False
        self.enabled = True
        self._base_sample: Optional[Tensor] = None  # see base_weight_sample
        self._written_sample: Optional[Tensor] = None

    # -- the base layer's own computation, with our weight ---------------------------------------------------------
    def base_forward(self, x: Tensor) -> Tensor:
        base = self.original_module
        if isinstance(base, nn.Linear):
            return F.linear(x, self.weight, self.bias)
        if isinstance(base, Conv1D):
            out = x.reshape(-1, x.shape[-1]) @ self.weight
            out = out + self.bias if self.bias is not None else out
            return out.view(*x.shape[:-1], self.weight.shape[1])
        if isinstance(base, CONV_TYPES):
            return base._conv_forward(x, self.weight, self.bias)
        if isinstance(base, nn.Embedding):
            return F.embedding(x, self.weight, base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
        raise TypeError(f"{type(base).__name__} has no base forward")  # excluded by is_supported

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_forward(x)
        if self.merged or not self.enabled:
            return out
        return self.update(x, out)

    def update(self, x: Tensor, base_out: Tensor) -> Tensor:
        """The base output plus this method's contribution."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """Merged weight minus unmerged weight, in the base weight's layout; valid whether merged or not."""
        raise NotImplementedError

    # -- merge algebra, written once for every weight-update method ------------------------------------------------
    def merged_weight(self) -> Tensor:
        """The weight with the update folded in, computed out of place (the model is not changed)."""
        if self.merged:
            return self.weight.detach()
        return (self.weight.detach().float() + self.delta_weight().float()).to(self.weight.dtype)

    def check_mergeable(self) -> None:
        if not self.merged and not torch.isfinite(self.merged_weight()).all():
            raise MergeError("merging would put inf/NaN into the weight; the adapter weights have diverged")

    def merge(self) -> None:
        if self.merged:
            return
        new_weight = self.merged_weight()
        base_sample = self.base_weight_sample() if _is_plain(self.weight) else None
        self.before_merge()
        with torch.no_grad():
            self.weight.copy_(new_weight)
        self.merged = True
        self._base_sample, self._written_sample = base_sample, _written(self.weight)

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            delta = self.delta_weight().float()
            self.weight.copy_((self.weight.float() - delta).to(self.weight.dtype))
        self.merged = False
        self.after_unmerge()
        self._written_sample = _written(self.weight)

    def base_weight_sample(self, samples: int = FINGERPRINT_SAMPLES) -> Tensor:
        """``weight_sample`` of the base weight without the update, for base fingerprints.

        Merging rounds: the merged weight minus the update, and the weight after unmerging, equal the base only up to
        rounding, which would change a hash of the values. So the sample taken before the first merge is returned as
        long as the weight is still what the last merge or unmerge wrote (nothing else has changed the base since).
        """
        kept = self._base_sample
        written = self._written_sample
        if kept is not None and written is not None and samples == FINGERPRINT_SAMPLES:
            now = _written(self.weight)
            if now is not None and now.dtype == written.dtype and torch.equal(now, written):
                return kept
        if not self.merged:
            return weight_sample(self.weight, samples)
        with torch.no_grad():
            return weight_sample(self.weight.float() - self.delta_weight().float(), samples)

    def before_merge(self) -> None:
        """Cache what ``delta_weight`` needs once the weight holds the merged value."""

    def after_unmerge(self) -> None:
        """Drop what ``before_merge`` cached."""

    # -- what belongs to the adapter -------------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, Tensor]:
        """Adapter-owned parameters and persistent buffers, named relative to the wrapped layer's path."""
        return {n: t for n, t in self.state_dict(keep_vars=True).items() if n not in ("weight", "bias")}

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        base = {id(self.weight), id(self.bias)}
        return (p for p in self.parameters() if id(p) not in base)

    def unwrap(self) -> nn.Module:
        """The original module, holding this layer's current weight and bias."""
        base = self.original_module
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        return f"base={type(self.original_module).__name__}, merged={self.merged}"


class InsertedAdapter(nn.Module):
    """An inserted-module adapter: attached as a child of one sublayer, it rewrites that sublayer's output through a
    forward hook. It never touches base weights and cannot merge."""

    attach_name = "adapter"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_hook", None)
        self.enabled = True

    def attach(self, sublayer: nn.Module) -> None:
        sublayer.add_module(self.attach_name, self)
        object.__setattr__(self, "_hook", sublayer.register_forward_hook(self._after_sublayer))

    def detach(self, sublayer: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            object.__setattr__(self, "_hook", None)
        delattr(sublayer, self.attach_name)

    def _after_sublayer(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self.enabled:
            return output
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)

    def adapter_tensors(self) -> dict[str, Tensor]:
        return {f"{self.attach_name}.{n}": t for n, t in self.state_dict(keep_vars=True).items()}

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How one method plugs into surgery: which layers it can adapt, how to build its adapter for one of them, and
    (for inserted methods) where it goes when the user names no targets."""

    name: str
    build: Callable[[nn.Module, AdapterConfig, str], nn.Module]
    is_supported: Callable[[nn.Module], bool]
    mergeable: bool
    default_targets: Optional[Callable[[nn.Module, AdapterConfig], list[str]]] = None


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    from .. import methods  # noqa: F401  (importing the package registers every method)

    return METHODS[name]
