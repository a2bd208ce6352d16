"""Merging adapters trained over a quantized base, with the measured cost (QLoRA, Dettmers et al. 2023).

A merge from a quantized base has three honest answers, and the user picks one (``target``):

- ``dequantized``: dequant(Wq) + dW, in the base's dtype (or ``dtype``): exactly what the trained model computed.
- ``requantized``: that, quantized again in the base's format: as small as the base, but 4 bits round most of a
  LoRA update away (axolotl #3803); the report says how much of the update was lost.
- ``original``: dW added to the full-precision weights the user points to (a safetensors file or directory, a state
  dict or a module): the update as trained, on the weights it was quantized from.

``merged_quantized_state_dict`` computes a target out of place (the model is unchanged) and ``merge_quantized`` folds
it into the model. Both return a ``MergeReport``, measured against the exact float result, and print it.
"""

from __future__ import annotations

import inspect

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .methods.base import AdaptedLayer, MergeError
from .quantize import HANDLERS, FrozenQuantizedLinear, dequantize, quantized_layers
from .surgery import _set_submodule, adapters, base_state_dict, disable_adapters, unload, weight_adapters

MERGE_TARGETS = ("dequantized", "requantized", "original")
OriginalWeights = Union[str, os.PathLike, Mapping[str, Tensor], nn.Module]


@dataclasses.dataclass
class MergeReport:
    """What a merge from a quantized base cost, measured.

    ``weight_max_error``/``weight_rel_error``: merged weights against the exact result of the target (max absolute
    error, and Frobenius norm of the error over that of the exact weights, over all merged layers);
    ``update_rel_error``: how much of the adapters' update the merged weights lost (error norm over update norm: 0 is
    all kept, 1 is as much lost as the update itself); ``logits_max_diff``/``logits_rel_diff``: the change of the
    model's output on the probe batch, merged against the trained model (None without a probe).
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


def frozen_quantized_layers(model: nn.Module) -> dict[str, FrozenQuantizedLinear]:
    """The quantized layers of ``model`` that carry no adapter, by path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, FrozenQuantizedLinear)}


# -- the full-precision weights of the 'original' target ---------------------------------------------------------------
class SafetensorsWeights(Mapping[str, Tensor]):
    """The tensors of a safetensors file, or of a directory of them (``save_pretrained``'s, sharded or not), read one
    key at a time, so pointing at an 8B model does not load it whole."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {key: path / name for key, name in weight_map.items()}
            else:
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise MergeError(f"original={str(path)!r} holds no .safetensors file; point it at the "
                                     "full-precision model's directory or file (save_pretrained's output).")
                self.files = {}
                for file in files:
                    with safe_open(str(file), framework="pt") as f:
                        self.files.update(dict.fromkeys(f.keys(), file))
        elif path.is_file():
            with safe_open(str(path), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), path)
        else:
            raise MergeError(f"original={str(path)!r} does not exist; point it at the full-precision weights (a "
                             ".safetensors file or save_pretrained's directory).")

    def __getitem__(self, key: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _original_weights(original: OriginalWeights, layers: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    if isinstance(original, (str, os.PathLike)):
        state: Mapping[str, Tensor] = SafetensorsWeights(original)
    else:
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
        raise MergeError("The 'original' merge target needs the full-precision weight of every quantized layer, "
                         "keyed by its name in the model's state dict (e.g. the base model's state_dict() or "
                         "save_pretrained directory): " + "; ".join(problems[:4])
                         + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
                         + ". The model is unchanged.")
    return found


# -- computing a target ------------------------------------------------------------------------------------------------
def _merged_weights(layers: dict[str, AdaptedLayer], target: str, originals: dict[str, Tensor],
                    dtype: Optional[torch.dtype]) -> tuple[dict[str, Tensor], MergeReport]:
    """Each quantized adapted layer's merged weight for ``target`` and what the merge cost (without the probe's
    part), computed out of place."""
    new_weights: dict[str, Tensor] = {}
    err_sq = ref_sq = lost_sq = update_sq = 0.0
    max_err, worst, worst_lost = 0.0, "", -1.0
    for path, layer in layers.items():
        update = sum(layer.delta_weight(n).float() for n in layer.adapters)
        start = originals[path].to(update.device).float() if target == "original" else dequantize(layer.weight).float()
        shift = layer.base_shift() if target == "original" else None
        if shift is not None:  # the original base minus what PiSSA/OLoRA moved into their adapter at injection
            start = start + shift.to(start.device).float()
        exact = start + update
        if not torch.isfinite(exact).all():
            raise MergeError(f"Merging {path} gives inf/NaN; the adapter has diverged, so nothing was merged.")
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


def probe_from_batch(model: nn.Module, batch: Any) -> Any:
    """The first example of a training batch as a probe for ``model`` (a tensor passed as its first argument, or a
    dict of the tensors whose keys ``model.forward`` names), detached; None when the batch has another form. The
    callback keeps one so that its fit-end merge report measures the output change too."""
    if isinstance(batch, Tensor):
        return batch[:1].detach().clone()
    if isinstance(batch, Mapping):
        named = inspect.signature(model.forward).parameters
        probe = {k: v[:1].detach().clone() for k, v in batch.items()
                 if isinstance(v, Tensor) and k in named and named[k].kind is not inspect.Parameter.VAR_KEYWORD}
        return probe or None
    return None


def probe_error(model: nn.Module, probe: Any) -> Optional[str]:
    """Why ``model`` cannot run ``probe`` (an exception's text), or None when it can."""
    try:
        with torch.no_grad():
            _output(model, probe)
    except Exception as err:  # noqa: BLE001 - any failure only means there is no probe measurement
        return f"{type(err).__name__}: {err}"
    return None


def _output(model: nn.Module, probe: Any) -> Tensor:
    out = model(**probe) if isinstance(probe, Mapping) else model(probe)
    out = getattr(out, "logits", out)
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().float()


def _probe_change(report: MergeReport, before: Tensor, after: Tensor) -> None:
    report.logits_max_diff = (after - before).abs().max().item()
    report.logits_rel_diff = (torch.linalg.vector_norm(after - before)
                              / torch.linalg.vector_norm(before).clamp_min(1e-30)).item()


def _check_target(target: str, original: Optional[OriginalWeights]) -> None:
    if target not in MERGE_TARGETS:
        raise MergeError(f"Unknown merge target {target!r}: use one of {MERGE_TARGETS}.")
    if target == "original" and original is None:
        raise MergeError("The 'original' merge target needs original=<the full-precision base: a .safetensors file, "
                         "save_pretrained's directory, a state dict or the model>.")


@torch.no_grad()
def merged_quantized_state_dict(model: nn.Module, target: str = "dequantized",
                                original: Optional[OriginalWeights] = None, dtype: Optional[torch.dtype] = None,
                                probe: Any = None, report: Optional[Callable[[str], None]] = print
                                ) -> tuple[dict[str, Tensor], MergeReport]:
    """The base state dict with every adapter folded in for ``target`` (see the module docstring), and the measured
    ``MergeReport`` (its text also goes to ``report``: default ``print``, None is silent). The model is unchanged.

    Quantized layers hold: ``dequantized``/``original``: plain tensors in ``dtype`` (default: the base's dtype, or the
    original weights' dtype); ``requantized``: quantized tensors (write them with ``quantize_io.save_quantized``).
    Adapted layers without a quantized base hold their usual merged weight; quantized layers without an adapter
    (``modules="all-linear"``) hold their dequantized, unchanged or original weight. ``probe``: a batch (a tensor, or a
    dict of keyword arguments) whose output is compared between the trained and the merged model.
    """
    _check_target(target, original)
    weight_adapters(model, "merge")  # inserted adapters and tied weights cannot merge
    layers, frozen = quantized_layers(model), frozen_quantized_layers(model)
    if not layers and not frozen:
        raise MergeError("The model has no quantized layer; use lightning_lora.merge, unload(merge=True) or "
                         "export_merged without merge_target.")
    originals = _original_weights(original, {**layers, **frozen}) if target == "original" else {}
    new_weights, result = _merged_weights(layers, target, originals, dtype)
    state = base_state_dict(model)
    merged: dict[str, Tensor] = {}
    for path, layer in adapters(model).items():
        if isinstance(layer, AdaptedLayer):
            weight = new_weights[path] if path in new_weights else layer.merged_weight()
            if path not in new_weights and not torch.isfinite(weight).all():
                raise MergeError(f"Merging {path} gives inf/NaN; the adapter has diverged, so nothing was merged.")
            merged[f"{path}.weight" if path else "weight"] = weight
    for path, layer in frozen.items():
        if target == "original":
            merged[f"{path}.weight"] = originals[path].to(dtype or originals[path].dtype)
        elif target == "dequantized":
            merged[f"{path}.weight"] = dequantize(layer.weight, dtype or layer.weight.dtype)
    state.update(merged)
    if probe is not None:
        before = _output(model, probe)
        with disable_adapters(model):  # the base op over the merged weights: the merged model's output
            after = _output(_WithWeights(model, merged), probe)
        _probe_change(result, before, after)
    if report is not None:
        report(str(result))
    return state, result


class _WithWeights(nn.Module):
    """Runs ``model`` with some weights replaced (``torch.func.functional_call``), leaving the model unchanged."""

    def __init__(self, model: nn.Module, weights: dict[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)
        object.__setattr__(self, "weights", weights)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.inner, self.weights, args, kwargs)


@torch.no_grad()
def merge_quantized(model: nn.Module, target: str = "dequantized", original: Optional[OriginalWeights] = None,
                    dtype: Optional[torch.dtype] = None, probe: Any = None,
                    report: Optional[Callable[[str], None]] = print) -> MergeReport:
    """Fold the adapters of a model with a quantized base into its weights and remove them (like ``unload(merge=True)``),
    for ``target`` (see the module docstring); returns the measured ``MergeReport`` and passes its text to ``report``
    (default ``print``; None is silent). ``merged_quantized_state_dict`` is the same without changing the model.

    ``original``: the full-precision base for the ``original`` target: a safetensors file or ``save_pretrained``
    directory, a state dict, or a module, with the model's key names. ``dtype``: of the merged weights (default: the
    base's, or the original weights'). ``probe``: a batch (a tensor, or a dict of keyword arguments) run before and
    after, for the output change. After a ``requantized`` merge the quantized layers are ``FrozenQuantizedLinear``;
    after the others, plain ``nn.Linear``. The model is unchanged on error. Layers without a quantized base are merged
    as ``unload(merge=True)`` does.
    """
    state, result = merged_quantized_state_dict(model, target, original, dtype, report=None)
    before = _output(model, probe) if probe is not None else None
    for path, layer in quantized_layers(model).items():  # the update is in the weight now: the adapters go
        weight, linear = state[f"{path}.weight"], layer.original_module
        if target == "requantized":
            frozen = FrozenQuantizedLinear(linear, weight)
            frozen.quantization = layer.quantization
            _set_submodule(model, path, frozen)
        else:
            linear.weight = nn.Parameter(weight, requires_grad=False)
            _set_submodule(model, path, linear)
    if target != "requantized":
        for path, layer in frozen_quantized_layers(model).items():
            _set_submodule(model, path, layer.unwrap(state[f"{path}.weight"]))
    unload(model, merge=True)  # adapted layers that were not quantized merge as usual
    if before is not None:
        _probe_change(result, before, _output(model, probe))
    if report is not None:
        report(str(result))
    return result
