"""QLoRA on torchao: the frozen base weights of adapted layers in NF4, int8 or int4, adapters in float32.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) trains adapters through a frozen 4-bit base. ``quantize_base`` swaps
the base weight of every adapted ``nn.Linear`` for a torchao tensor subclass, layer by layer (so the full-precision
weights never need to sit on the accelerator at once), and points the layer's base op at ``QuantizedLinear``: forward
``x @ dequant(W).T``, backward ``grad @ dequant(W)``, keeping only the quantized ``W`` for backward. Gradients thus reach
the input, and through it the adapters of earlier layers, in every format, including those whose torchao matmul has
no backward (int4 tile-packed).

A merge from a quantized base has three honest answers, and ``merge_quantized`` lets the user pick one and measures
what it cost (``MergeReport``): ``dequantized`` (what the trained model computed), ``requantized`` (same format,
smaller, lossy: 4 bits round most of a LoRA update away) or ``original`` (the update added to the full-precision
weights the user points to).

torchao is imported lazily, so the rest of the package does not need it.
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
from .methods.base import AdaptedLayer, MergeError
from .surgery import _set_submodule, adapters, unload, weight_adapters

log = logging.getLogger(__name__)


# -- formats ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NF4Config:
    """4-bit NormalFloat with double quantization (QLoRA's format, torchao ``NF4Tensor``).

    Each ``block_size`` weights share one scale; the scales are themselves quantized to 8 bits in blocks of
    ``scaler_block_size``. A layer's weight count must be a multiple of ``block_size * scaler_block_size``.
    """

    block_size: int = 64
    scaler_block_size: int = 256
    format = "nf4"


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """int8 weight-only, one symmetric scale per output row (torchao ``Int8WeightOnlyConfig``)."""

    format = "int8"


@dataclasses.dataclass(frozen=True)
class Int4Config:
    """int4 weight-only, asymmetric, one scale and zero point per ``group_size`` weights of a row.

    ``packing``: ``intx`` is torchao's ``IntxUnpackedToInt8Tensor`` with int4 values: it runs anywhere (pure tensor
    ops, the CPU included) but stores each 4-bit value in a byte. ``tile_packed`` is torchao's CUDA layout
    (``Int4TilePackedTo4dTensor``, bfloat16, 2 weights a byte), whose only unpacking is a matmul with the identity (see
    ``_dequantize_int4_tile_packed``): half the memory, much slower steps; not yet run on a GPU by our tests.
    ``auto`` is ``intx``.
    """

    group_size: int = 128
    packing: str = "auto"
    format = "int4"

    def __post_init__(self) -> None:
        if self.packing not in ("auto", "tile_packed", "intx"):
            raise ConfigError(f"Int4Config(packing={self.packing!r}): use 'auto', 'tile_packed' or 'intx'.")


QuantizeConfig = Union[NF4Config, Int8Config, Int4Config]
FORMATS: dict[str, type] = {"nf4": NF4Config, "int8": Int8Config, "int4": Int4Config}
MERGE_TARGETS = ("dequantized", "requantized", "original")


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

    return to_nf4(weight.contiguous(), config.block_size, config.scaler_block_size)


def _nf4_check(shape: tuple[int, ...], config: NF4Config) -> Optional[str]:
    numel = math.prod(shape)
    if numel % config.block_size:
        return f"{numel} weights are not a multiple of block_size={config.block_size}"
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


def _dequantizers() -> dict[type, Callable[[Tensor], Tensor]]:
    from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
        Int4TilePackedTo4dTensor,
    )
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    return {
        NF4Tensor: lambda w: w.get_original_weight(),
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


# -- converting a model ----------------------------------------------------------------------------------------------
def _quantizable_layers(model: nn.Module, config: QuantizeConfig) -> dict[str, AdaptedLayer]:
    """The adapted layers to quantize (already quantized ones left out), after checking every one of them, so that
    an error leaves the model unchanged."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
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


@torch.no_grad()
def quantize_base(model: nn.Module, config: Union[str, dict, QuantizeConfig],
                  device: Union[str, torch.device, None] = None) -> list[str]:
    """Quantize the frozen base weight of every adapted ``nn.Linear`` in ``model`` to ``config``'s format, in place;
    returns the paths converted. Adapters stay float32; an untrained DoRA magnitude restarts from the quantized
    weight's norms (``WeightUpdate.after_base_replaced``), so the adapted model still equals its base at step 0.

    Layer by layer: each weight is moved to ``device`` (default: where it is), quantized there and replaces the
    original, so a model loaded on the CPU is quantized onto the GPU without the full-precision base ever being there
    at once. Idempotent: layers already in this format are skipped. Every layer is checked first (shapes, frozen,
    untied, not merged), so an error leaves the model unchanged. The base fingerprint stays that of the original
    weights, so an adapter trained over a quantized base loads onto the full-precision one.
    """
    config = as_quantize_config(config)
    _register_dequantizers()
    todo = _quantizable_layers(model, config)
    handler = HANDLERS[type(config)]
    for path, layer in todo.items():
        source = layer.weight
        quantized = nn.Parameter(handler.quantize(source.detach().to(device or source.device), config),
                                 requires_grad=False)
        layer.source_sample = fingerprint.sample(source)  # the base fingerprint stays the full-precision one's
        layer.weight = quantized
        layer.original_module.weight = quantized  # the original module must not keep the dense weight alive
        layer.base_op = quantized_linear
        layer.quantization = config
        for update in layer.adapters.values():
            update.after_base_replaced(layer)
        log.debug("lightning_lora: quantized %s to %s", path, config)
    return list(todo)


def quantized_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """The adapted layers of ``model`` whose base weight is quantized, by path."""
    return {p: a for p, a in adapters(model).items() if isinstance(a, AdaptedLayer) and is_quantized(a.weight)}


# -- merging ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MergeReport:
    """What a merge from a quantized base cost, measured.

    ``weight_max_error``/``weight_rel_error``: merged weights against the exact result of the target (max absolute
    error, and Frobenius norm of the error over that of the exact weights, over all merged layers);
    ``update_rel_error``: how much of the adapters' update the merged weights lost (error norm over update norm: 0 is
    all kept, 1 is as much lost as the update itself); ``logits_max_diff``: the largest change of the model's output on
    the probe batch between before and after the merge (None without a probe).
    """

    target: str
    layers: int
    weight_max_error: float
    weight_rel_error: float
    update_rel_error: float
    worst_layer: str
    logits_max_diff: Optional[float] = None
    logits_rel_diff: Optional[float] = None

    def __str__(self) -> str:
        lines = [f"lightning_lora: merged {self.layers} quantized layers, target {self.target!r}:",
                 f"  weights vs exact: max abs error {self.weight_max_error:.3g}, relative {self.weight_rel_error:.3g}",
                 f"  adapter update lost: {100 * self.update_rel_error:.1f}%"
                 + (f" (worst layer {self.worst_layer})" if self.update_rel_error > 0 else "")]
        if self.logits_max_diff is not None:
            lines.append(f"  probe output change: max abs {self.logits_max_diff:.3g}, relative {self.logits_rel_diff:.3g}")
        if self.target == "requantized" and self.update_rel_error > 0.5:
            lines.append("  most of the adapter's update was rounded away by requantizing; merge to 'dequantized' or "
                         "'original' to keep it")
        return "\n".join(lines)


def _output(model: nn.Module, probe: Any) -> Tensor:
    out = model(**probe) if isinstance(probe, Mapping) else model(probe)
    out = getattr(out, "logits", out)
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().float()


def _original_weights(original: Union[Mapping[str, Tensor], nn.Module], layers: dict[str, AdaptedLayer]) -> dict[str, Tensor]:
    state = original.state_dict() if isinstance(original, nn.Module) else original
    found, problems = {}, []
    for path, layer in layers.items():
        key = f"{path}.weight"
        weight = state.get(key)
        if weight is None:
            problems.append(f"{key} is missing")
        elif tuple(weight.shape) != tuple(layer.weight.shape):
            problems.append(f"{key} is {tuple(weight.shape)}, the model's is {tuple(layer.weight.shape)}")
        else:
            found[path] = weight
    if problems:
        raise MergeError("merge_quantized(target='original') needs the full-precision weight of every quantized layer, "
                         "keyed by its name in the model's state dict (e.g. the base model's state_dict()): "
                         + "; ".join(problems[:4]) + ". The model is unchanged.")
    return found


def _merged_weights(layers: dict[str, AdaptedLayer], target: str, originals: dict[str, Tensor],
                    dtype: Optional[torch.dtype]) -> tuple[dict[str, Tensor], MergeReport]:
    """Each quantized layer's merged weight for ``target`` and what the merge cost (without the probe's part),
    computed out of place: the model is unchanged."""
    new_weights: dict[str, Tensor] = {}
    err_sq = ref_sq = lost_sq = update_sq = 0.0
    max_err, worst, worst_lost = 0.0, "", -1.0
    for path, layer in layers.items():
        update = sum(layer.delta_weight(n).float() for n in layer.adapters)
        start = originals[path].to(update.device).float() if target == "original" else dequantize(layer.weight).float()
        exact = start + update
        if target == "requantized":
            new = HANDLERS[type(layer.quantization)].quantize(exact.to(layer.weight.dtype), layer.quantization)
            result = dequantize(new).float()
        else:
            new = exact.to(dtype or (originals[path].dtype if target == "original" else layer.weight.dtype))
            result = new.float()
        err = result - exact
        lost = torch.linalg.vector_norm(result - start - update).item() ** 2
        layer_update = torch.linalg.vector_norm(update).item() ** 2
        err_sq += torch.linalg.vector_norm(err).item() ** 2
        ref_sq += torch.linalg.vector_norm(exact).item() ** 2
        lost_sq, update_sq = lost_sq + lost, update_sq + layer_update
        max_err = max(max_err, err.abs().max().item())
        if lost / max(layer_update, 1e-30) > worst_lost:
            worst, worst_lost = path, lost / max(layer_update, 1e-30)
        new_weights[path] = new
    return new_weights, MergeReport(target, len(layers), max_err, math.sqrt(err_sq / max(ref_sq, 1e-30)),
                                    math.sqrt(lost_sq / max(update_sq, 1e-30)), worst)


@torch.no_grad()
def dequantized_merge(model: nn.Module) -> tuple[dict[str, Tensor], Optional[MergeReport]]:
    """The ``dequantized`` merge target of every quantized adapted layer, by path, and its ``MergeReport``, without
    changing the model (for ``export_merged``); ``({}, None)`` when no base weight is quantized."""
    layers = quantized_layers(model)
    return _merged_weights(layers, "dequantized", {}, None) if layers else ({}, None)


@torch.no_grad()
def merge_quantized(model: nn.Module, target: str = "dequantized", original: Union[Mapping[str, Tensor], nn.Module, None] = None,
                    dtype: Optional[torch.dtype] = None, probe: Any = None,
                    report: Optional[Callable[[str], None]] = print) -> MergeReport:
    """Fold the adapters of a model with a quantized base into its weights and remove them (like ``unload(merge=True)``);
    returns the measured ``MergeReport`` and passes its text to ``report`` (default ``print``; None is silent).

    ``target``:
      - ``dequantized``: dequant(Wq) + dW in ``dtype`` (default: the base's dtype): what the trained model computed.
      - ``requantized``: the same, quantized again in the base's format: small, but 4 bits round most of a LoRA update
        away (the report says how much).
      - ``original``: dW added to the full-precision weights in ``original`` (a state dict or module with the model's
        key names), in ``dtype`` (default: theirs): the update as trained, on the base it was quantized from.

    ``probe``: a batch (a tensor, or a dict of keyword arguments) to run before and after, for the output change. The
    model is unchanged on error. Layers without a quantized base are merged as ``unload(merge=True)`` does.
    """
    if target not in MERGE_TARGETS:
        raise MergeError(f"merge_quantized(target={target!r}): use one of {MERGE_TARGETS}.")
    if target == "original" and original is None:
        raise MergeError("merge_quantized(target='original') needs original=<the full-precision base model or its "
                         "state dict>.")
    weight_adapters(model, "merge")  # inserted adapters and tied weights cannot merge
    layers = quantized_layers(model)
    if not layers:
        raise MergeError("The model has no quantized adapted layer; use lightning_lora.merge or unload(merge=True).")
    originals = _original_weights(original, layers) if target == "original" else {}
    before = _output(model, probe) if probe is not None else None

    new_weights, result = _merged_weights(layers, target, originals, dtype)
    others = [a for p, a in adapters(model).items() if p not in layers and isinstance(a, AdaptedLayer)]
    for layer in others:
        layer.check_mergeable()
    for path, layer in layers.items():
        layer.weight = nn.Parameter(new_weights[path], requires_grad=False)
        _set_submodule(model, path, layer.unwrap())  # its update is in the weight now: the adapters go
    unload(model, merge=True)  # adapted layers that were not quantized merge as usual

    if before is not None:
        after = _output(model, probe)
        result.logits_max_diff = (after - before).abs().max().item()
        result.logits_rel_diff = (torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before).clamp_min(1e-30)).item()
    if report is not None:
        report(str(result))
    return result
