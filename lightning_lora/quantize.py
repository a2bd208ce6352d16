"""QLoRA on torchao: the frozen base weights in NF4, int8 or int4, adapters in float32.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) trains adapters through a frozen 4-bit base. ``quantize_base`` swaps
the base weight of every adapted ``nn.Linear`` (and with ``modules="all-linear"`` of every frozen one) for a
quantized tensor subclass, layer by layer on the training device (so the full-precision weights never sit on the
accelerator at once), and points the layer's base op at ``QuantizedLinear``: forward ``x @ dequant(W).T``, backward
``grad @ dequant(W)``, keeping only the quantized ``W`` for backward. Gradients thus reach the input, and through it
the adapters of earlier layers, in every format. Formats: torchao's ``NF4Tensor`` and ``Int8Tensor``, and for int4
our packed layout (``int4.py``), whose dequantization is plain tensor ops on the CPU and CUDA alike.

Merging from a quantized base (three targets, each measured) is ``quantize_merge.py``; quantized weights in files are
``quantize_io.py``. torchao is imported lazily, so the rest of the package does not need it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fingerprint
from .config import ConfigError
from .methods import base
from .methods.base import AdaptedLayer
from .surgery import adapters

log = logging.getLogger(__name__)


# -- formats ---------------------------------------------------------------------------------------------------------
MODULES = ("adapted", "all-linear")


def _modules_field() -> Any:
    """``modules``, an option of every format: which frozen linear layers to quantize. ``adapted`` (default): the base
    of each adapted ``nn.Linear``; ``all-linear``: also every frozen ``nn.Linear`` without an adapter (QLoRA quantizes
    the whole base), except the output layer (``get_output_embeddings``) and tied weights."""
    return dataclasses.field(default="adapted", kw_only=True)


def _check_modules(config: Any) -> None:
    if config.modules not in MODULES:
        raise ConfigError(f"{type(config).__name__}(modules={config.modules!r}): use 'adapted' (the adapted layers' "
                          "base) or 'all-linear' (every frozen nn.Linear but the output layer).")


@dataclasses.dataclass(frozen=True)
class NF4Config:
    """4-bit NormalFloat (QLoRA's format, torchao ``NF4Tensor``): each ``block_size`` weights share one absmax scale.

    ``double_quantization`` (QLoRA's second step): the scales are themselves quantized to 8 bits in blocks of
    ``scaler_block_size`` (about 0.13 bits a weight for scales instead of 0.25 with bf16 scales); a layer's weight count
    must then be a multiple of ``block_size * scaler_block_size``. Off, the scales stay in the weight's dtype and only
    ``block_size`` must divide the weight count (``scaler_block_size`` is unused).
    """

    block_size: int = 64
    scaler_block_size: int = 256
    double_quantization: bool = True
    modules: str = _modules_field()
    format = "nf4"

    def __post_init__(self) -> None:
        _check_modules(self)
        for name in ("block_size", "scaler_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"NF4Config({name}={value!r}): give a positive integer, e.g. {name}=64.")
        if self.block_size % 2:
            raise ConfigError(f"NF4Config(block_size={self.block_size}): NF4 packs two weights a byte, so block_size "
                              "must be even, e.g. 64.")
        if not isinstance(self.double_quantization, bool):
            raise ConfigError(f"NF4Config(double_quantization={self.double_quantization!r}): give true or false.")


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """int8 weight-only, one symmetric scale per output row (torchao ``Int8WeightOnlyConfig``)."""

    modules: str = _modules_field()
    format = "int8"

    def __post_init__(self) -> None:
        _check_modules(self)


@dataclasses.dataclass(frozen=True)
class Int4Config:
    """int4 weight-only, asymmetric, one scale and zero point per ``group_size`` weights of a row.

    ``packing``: ``packed`` (the default, ``auto``) is ours (``int4.PackedInt4Tensor``): two 4-bit codes a byte,
    dequantized by pure tensor ops that ``torch.compile`` fuses, the same on the CPU and CUDA. ``intx`` is torchao's
    ``IntxUnpackedToInt8Tensor`` with int4 values (runs anywhere, but a byte per 4-bit value). ``tile_packed`` is
    torchao's CUDA tinygemm layout (``Int4TilePackedTo4dTensor``, bfloat16, 2 weights a byte), whose only unpacking is
    a matmul with the identity (see ``_dequantize_int4_tile_packed``): for memory only, far slower steps.
    """

    group_size: int = 128
    packing: str = "auto"
    modules: str = _modules_field()
    format = "int4"

    def __post_init__(self) -> None:
        _check_modules(self)
        if self.packing not in ("auto", "packed", "tile_packed", "intx"):
            raise ConfigError(f"Int4Config(packing={self.packing!r}): use 'auto' (= 'packed'), 'intx' or "
                              "'tile_packed'.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0 \
                or self.group_size % 2:
            raise ConfigError(f"Int4Config(group_size={self.group_size!r}): give a positive even integer, e.g. 128.")


QuantizeConfig = Union[NF4Config, Int8Config, Int4Config]
FORMATS: dict[str, type] = {"nf4": NF4Config, "int8": Int8Config, "int4": Int4Config}


def as_quantize_config(value: Union[str, dict, QuantizeConfig, None]) -> Optional[QuantizeConfig]:
    """A format config from a config, a format name (``"nf4"``), or a dict (``{"format": "nf4", "block_size": 64}``)."""
    if value is None or isinstance(value, tuple(FORMATS.values())):
        return value
    options: dict[str, Any] = {"format": value} if isinstance(value, str) else dict(value) if isinstance(value, Mapping) else {}
    name = options.pop("format", None)
    if name not in FORMATS:
        raise ConfigError(f"Unknown quantization format {name!r} (from {value!r}); use one of {sorted(FORMATS)}, e.g. "
                          "quantize='nf4' or quantize={'format': 'int4', 'group_size': 64}.")
    fields = {f.name for f in dataclasses.fields(FORMATS[name])}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"{name} quantization has no option {unknown}; its options are {sorted(fields) or 'none'}.")
    return FORMATS[name](**options)


@dataclasses.dataclass(frozen=True)
class FormatHandler:
    """How one format quantizes a weight (``quantize``) and which shapes it takes (``check``: why not, or None). The
    torchao tensor types it produces are dequantized through ``methods.base.DEQUANTIZERS`` (see ``_dequantizers``)."""

    quantize: Callable[[Tensor, Any], Tensor]
    check: Callable[[tuple[int, ...], Any], Optional[str]]


def _nf4_quantize(weight: Tensor, config: NF4Config) -> Tensor:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    if config.double_quantization:
        return to_nf4(weight.contiguous(), config.block_size, config.scaler_block_size)
    # torchao always double-quantizes; its scale decoding (codes / factor + mean) is exact with the plain absmax
    # scales as the "codes", a factor of 1 and a mean of 0, so that is how single quantization is stored.
    n_blocks = weight.numel() // config.block_size
    nf4 = to_nf4(weight.contiguous(), config.block_size, n_blocks)  # one scaler block: the cheapest valid shape
    nf4.quantized_scalers = weight.detach().reshape(n_blocks, config.block_size).abs().amax(dim=1)
    nf4.quantization_factor = torch.ones_like(nf4.quantization_factor)
    nf4.scaler_mean = torch.zeros_like(nf4.scaler_mean)
    return nf4


def _nf4_check(shape: tuple[int, ...], config: NF4Config) -> Optional[str]:
    numel = math.prod(shape)
    if numel % config.block_size:
        return f"{numel} weights are not a multiple of block_size={config.block_size}"
    if not config.double_quantization:
        return None
    scalers = numel // config.block_size
    if scalers % config.scaler_block_size:
        fits = math.gcd(scalers, config.scaler_block_size)
        return (f"its {scalers} block scales are not a multiple of scaler_block_size={config.scaler_block_size} "
                f"(scaler_block_size={fits} divides them)")
    return None


def _via_torchao_config(weight: Tensor, torchao_config: Any) -> Tensor:
    """Quantize one weight with a torchao ``quantize_`` config, through a throwaway ``nn.Linear`` that holds it."""
    from torchao.quantization import quantize_

    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(holder, torchao_config)
    return holder.weight.detach()


def _int8_quantize(weight: Tensor, config: Int8Config) -> Tensor:
    from torchao.quantization import Int8WeightOnlyConfig

    return _via_torchao_config(weight, Int8WeightOnlyConfig())


def _int4_quantize(weight: Tensor, config: Int4Config) -> Tensor:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        IntxWeightOnlyConfig,
        MappingType,
        PerGroup,
    )

    if config.packing in ("auto", "packed"):
        from .int4 import quantize_int4

        return quantize_int4(weight, config.group_size)
    if config.packing == "tile_packed":
        if not weight.is_cuda:
            raise ConfigError("Int4Config(packing='tile_packed') needs CUDA weights (torchao's tinygemm layout); use "
                              "packing='intx' (or 'auto') on the CPU.")
        return _via_torchao_config(weight.to(torch.bfloat16), Int4WeightOnlyConfig(
            group_size=config.group_size, int4_packing_format="tile_packed_to_4d"))
    return _via_torchao_config(weight, IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(config.group_size), mapping_type=MappingType.ASYMMETRIC))


def _int4_check(shape: tuple[int, ...], config: Int4Config) -> Optional[str]:
    if shape[-1] % config.group_size:
        return f"its {shape[-1]} input features are not a multiple of group_size={config.group_size}"
    return None


HANDLERS: dict[type, FormatHandler] = {
    NF4Config: FormatHandler(_nf4_quantize, _nf4_check),
    Int8Config: FormatHandler(_int8_quantize, lambda shape, config: None),
    Int4Config: FormatHandler(_int4_quantize, _int4_check),
}


# -- dequantization and the training path ----------------------------------------------------------------------------
def _dequantize_int4_tile_packed(weight: Tensor) -> Tensor:
    # torchao 0.18 has no unpack op for the tinygemm layout: its own matmul with the identity returns W^T exactly (in
    # bfloat16). That costs a (padded in)^2 x out product per call, so this layout is for memory, not speed.
    out_features, in_features = weight.shape
    padded = -(-in_features // 1024) * 1024  # the layout pads in_features to a multiple of 1024
    eye = torch.eye(padded, device=weight.device, dtype=torch.bfloat16)
    wt = torch.ops.aten._weight_int4pack_mm(eye, weight.qdata, weight.block_size[-1], weight.scale_and_zero)
    return wt[:in_features, :out_features].T


def _dequantize_nf4(weight: Tensor) -> Tensor:
    """``NF4Tensor.get_original_weight``, bit for bit, in three full-size kernels instead of about nine: each packed
    byte indexes a 256-entry table of its two NF4 values (in the weight's dtype), then each block is scaled. Eager
    steps were spending a quarter of their time in torchao's shift/long/index/stack chain (RESULTS.md, QLoRA run 2)."""
    nf4 = weight.nf4
    pairs = torch.stack((nf4.repeat_interleave(16), nf4.repeat(16)), dim=-1)  # byte b -> (nf4[b >> 4], nf4[b & 15])
    values = pairs.index_select(0, weight.quantized_data.to(torch.int32))
    scalers = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)
    return (values.view(weight.n_blocks, weight.block_size) * scalers.unsqueeze(-1)).view(weight.shape)


def _dequantizers() -> dict[type, Callable[[Tensor], Tensor]]:
    from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
        Int4TilePackedTo4dTensor,
    )
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    from .int4 import PackedInt4Tensor

    return {
        PackedInt4Tensor: lambda w: w.dequantize(),
        NF4Tensor: _dequantize_nf4,
        Int8Tensor: lambda w: w.dequantize(),
        IntxUnpackedToInt8Tensor: lambda w: w.dequantize(),
        Int4TilePackedTo4dTensor: _dequantize_int4_tile_packed,
    }


def _register_dequantizers() -> None:
    """Teach ``methods.base.dense`` the torchao types, so merges and DoRA's norms see plain weights."""
    if not base.DEQUANTIZERS:
        base.DEQUANTIZERS.update(_dequantizers())


def is_quantized(weight: Tensor) -> bool:
    """Whether ``weight`` is a quantized tensor subclass this module made (or can dequantize)."""
    return type(weight) in base.DEQUANTIZERS


def dequantize(weight: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A plain tensor holding ``weight``'s values (in ``dtype``, default its logical dtype)."""
    dense = base.dense(weight)
    return dense if dtype is None else dense.to(dtype)


class QuantizedLinear(torch.autograd.Function):
    """``x @ dequant(W).T`` with a backward to ``x`` only (W is frozen): ``grad @ dequant(W)``. Only the quantized W
    is saved; the dense copy lives for one matmul in forward and one in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize(weight, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None]:
        (weight,) = ctx.saved_tensors
        return (grad @ dequantize(weight, grad.dtype) if ctx.needs_input_grad[0] else None), None


def quantized_linear(layer: AdaptedLayer, x: Tensor) -> Tensor:
    """The base op of an ``AdaptedLayer`` whose ``nn.Linear`` weight is quantized."""
    out = QuantizedLinear.apply(x, layer.weight)
    return out if layer.bias is None else out + layer.bias.to(out.dtype)


class FrozenQuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is quantized and that has no adapter: ``x @ dequant(W).T + b`` through
    ``QuantizedLinear``. Used for the layers QLoRA quantizes without adapting them (``quantize_base(...,
    modules="all-linear")``) and by ``load_quantized``; its state dict keys are ``nn.Linear``'s, and ``unwrap`` gives
    the ``nn.Linear`` back."""

    def __init__(self, linear: nn.Linear, weight: Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "original_module", linear)  # kept out of the module tree, as AdaptedLayer does
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        linear.weight = self.weight  # the nn.Linear must not keep the dense weight alive
        self.register_parameter("bias", linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = QuantizedLinear.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def unwrap(self, weight: Optional[Tensor] = None) -> nn.Linear:
        """The ``nn.Linear`` back, holding ``weight`` (default: this layer's, dequantized)."""
        linear = self.original_module
        linear.weight = nn.Parameter(dequantize(self.weight) if weight is None else weight, requires_grad=False)
        return linear

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        # As AdaptedLayer._apply: replace the quantized Parameter instead of swapping it in place (compile holds weak
        # references to it); a dtype cast dequantizes, and the layer is a plain nn.Linear again.
        if self._parameters.get("weight") is None:  # kept out of the parameters under DeepSpeed (deepspeed_quantized)
            return super()._apply(fn, recurse)
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        with torch.no_grad():
            self.weight = self.original_module.weight = nn.Parameter(fn(weight), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={type(self.weight).__name__}"


# -- converting a model ----------------------------------------------------------------------------------------------
def _quantizable_layers(model: nn.Module, config: QuantizeConfig) -> dict[str, AdaptedLayer]:
    """The adapted layers to quantize (already quantized ones left out), after checking every one of them, so that
    an error leaves the model unchanged."""
    owners = _owners(model)
    todo, problems = {}, []
    for path, layer in adapters(model).items():
        if not isinstance(layer, AdaptedLayer):
            continue
        weight = layer.weight
        if is_quantized(weight):
            done = getattr(layer, "quantization", None)
            if done != config:
                problems.append(f"{path} is already quantized as {done}; rebuild the model from its original weights "
                                "to use another format")
            continue
        if type(layer.original_module) is not nn.Linear:
            problems.append(f"{path} is a {type(layer.original_module).__name__}; only nn.Linear bases can be "
                            "quantized (leave it out with exclude_modules)")
        elif weight.requires_grad:
            problems.append(f"{path}.weight is trainable; only frozen base weights are quantized (inject the adapter "
                            "first, which freezes the base, or set requires_grad=False)")
        elif layer.merged:
            problems.append(f"{path} has a merged adapter; unmerge it before quantizing")
        elif len(owners.get(id(weight), [])) > 1:
            problems.append(f"{path}.weight is tied to {[n for n in owners[id(weight)] if n != path + '.weight']}; "
                            "untie it or exclude the layer")
        else:
            why = HANDLERS[type(config)].check(tuple(weight.shape), config)
            if why is not None:
                problems.append(f"{path} ({tuple(weight.shape)}): {why}")
            todo[path] = layer
    if problems:
        raise ConfigError(f"Cannot quantize the base to {config}: " + "; ".join(problems[:4])
                          + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "") + ".")
    return todo


def _frozen_linears(model: nn.Module, config: QuantizeConfig, owners: dict[int, list[str]]) -> dict[str, nn.Linear]:
    """For ``modules="all-linear"``: the frozen ``nn.Linear`` layers without an adapter, checked like adapted ones."""
    from .methods.inserted import InsertedAdapter

    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    inside = tuple(f"{p}." for p, m in model.named_modules() if isinstance(m, (AdaptedLayer, InsertedAdapter)))
    todo, problems = {}, []
    for path, module in model.named_modules():
        if type(module) is not nn.Linear or module is output or path.startswith(inside):
            continue
        if any(p.requires_grad for p in module.parameters()) or len(owners.get(id(module.weight), [])) > 1:
            continue  # trained or tied: not part of the frozen base that QLoRA quantizes
        why = HANDLERS[type(config)].check(tuple(module.weight.shape), config)
        if why is not None:
            problems.append(f"{path} {tuple(module.weight.shape)}: {why}")
        todo[path] = module
    if problems:
        raise ConfigError(f"Cannot quantize the base to {config}: " + "; ".join(problems[:4])
                          + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
                          + ". Use modules='adapted' to quantize only the adapted layers.")
    return todo


def _owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return owners


@torch.no_grad()
def quantize_base(model: nn.Module, config: Union[str, dict, QuantizeConfig],
                  device: Union[str, torch.device, None] = None) -> list[str]:
    """Quantize the frozen base weight of every adapted ``nn.Linear`` in ``model`` to ``config``'s format, in place
    (with ``modules="all-linear"`` also every frozen ``nn.Linear`` without an adapter, which becomes a
    ``FrozenQuantizedLinear``); returns the paths converted. Adapters stay float32; an untrained DoRA magnitude
    restarts from the quantized weight's norms (``WeightUpdate.after_base_replaced``), so the adapted model still
    equals its base at step 0.

    Layer by layer: each weight is moved to ``device`` (default: where it is), quantized there and replaces the
    original, so a model loaded on the CPU is quantized onto the GPU without the full-precision base ever being there
    at once. Idempotent: layers already in this format are skipped. Every layer is checked first (shapes, frozen,
    untied, not merged), so an error leaves the model unchanged. The base fingerprint stays that of the original
    weights, so an adapter trained over a quantized base loads onto the full-precision one.
    """
    config = as_quantize_config(config)
    _register_dequantizers()
    todo = _quantizable_layers(model, config)
    frozen = _frozen_linears(model, config, _owners(model)) if config.modules == "all-linear" else {}
    handler = HANDLERS[type(config)]
    for path, linear in frozen.items():
        source = linear.weight
        layer = FrozenQuantizedLinear(linear, handler.quantize(source.detach().to(device or source.device), config))
        layer.source_sample = fingerprint.sample(source)
        layer.quantization = config
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, layer)
        del source, linear
        log.debug("lightning_lora: quantized %s (no adapter) to %s", path, config)
    for path, layer in todo.items():
        source = layer.weight
        quantized = nn.Parameter(handler.quantize(source.detach().to(device or source.device), config),
                                 requires_grad=False)
        if getattr(layer, "source_sample", None) is None:  # PiSSA/OLoRA keep the sample of the weight before them
            layer.source_sample = fingerprint.sample(source)  # the base fingerprint stays the full-precision one's
        layer.weight = quantized
        layer.original_module.weight = quantized  # the original module must not keep the dense weight alive
        layer.base_op = quantized_linear
        layer.quantization = config
        for update in layer.adapters.values():
            update.after_base_replaced(layer)
        log.debug("lightning_lora: quantized %s to %s", path, config)
    return [*todo, *frozen]


def quantized_weight_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s quantized parameters (adapted or not)."""
    return [name for name, param in model.named_parameters() if is_quantized(param)]


def quantized_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """The adapted layers of ``model`` whose base weight is quantized, by path."""
    return {p: a for p, a in adapters(model).items() if isinstance(a, AdaptedLayer) and is_quantized(a.weight)}


_MERGE_NAMES = ("MERGE_TARGETS", "MergeReport", "merge_quantized", "merged_quantized_state_dict")


def __getattr__(name: str) -> Any:
    # The merge targets live in quantize_merge.py (which imports this module); their old home still answers.
    if name in _MERGE_NAMES:
        from . import quantize_merge

        return getattr(quantize_merge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
