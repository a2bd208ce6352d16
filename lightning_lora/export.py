"""Merged export: the base with every update folded in, written as ``save_pretrained`` or a safetensors file."""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import PathLike, check_export_target, export_directory
from .methods.base import MergeError
from .methods.inserted import InsertedAdapter
from .quantize import quantized_layers
from .quantize_io import QUANTIZED_WEIGHTS, save_quantized
from .quantize_merge import (
    MERGE_TARGETS,
    MergeReport,
    OriginalWeights,
    frozen_quantized_layers,
    merged_quantized_state_dict,
)
from .surgery import adapters, base_state_dict, weight_adapters

log = logging.getLogger(__name__)

MERGED_WEIGHTS = "model.safetensors"
MERGED_KIND = "merged"


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base state dict with every update folded in, computed out of place: the model is not changed. Over a
    quantized base, the ``dequantized`` target (``quantize_merge``).

    Raises ``MergeError`` for inserted adapters and for updates that would put inf/NaN into a weight."""
    return _merge(model)[0]


def _merge(model: nn.Module, target: str = "dequantized", original: Optional[OriginalWeights] = None,
           probe: Any = None) -> tuple[dict[str, Tensor], Optional[MergeReport]]:
    """``merged_state_dict`` for ``target``, and the ``MergeReport`` of its quantized layers (None when no weight is
    quantized; then only the ``dequantized`` target, the plain merge, is accepted)."""
    if quantized_layers(model) or frozen_quantized_layers(model):
        return merged_quantized_state_dict(model, target, original, probe=probe, report=None)
    if target not in MERGE_TARGETS:
        raise MergeError(f"Unknown merge target {target!r}: use one of {MERGE_TARGETS}.")
    if target != "dequantized":
        raise MergeError(f"merge_target={target!r} chooses what a quantized base merges into, and this model has no "
                         "quantized weight; leave merge_target at 'dequantized' (a plain merge).")
    layers = {id(layer) for layer in weight_adapters(model, "merge")}
    state = base_state_dict(model)
    for path, layer in adapters(model).items():
        if isinstance(layer, InsertedAdapter):  # a mergeable one (weight_adapters refused the others): BitFit's biases
            state.update({f"{path}.{k}" if path else k: v for k, v in layer.merged_tensors().items()})
            continue
        if id(layer) not in layers:
            continue
        merged = layer.merged_weight()
        if not torch.isfinite(merged).all():
            raise MergeError(f"Merging {path} gives inf/NaN; the adapter has diverged, so no merged model was written.")
        state[f"{path}.weight" if path else "weight"] = merged
    return state, None


@contextlib.contextmanager
def _gguf_loaded_savable(model: nn.Module) -> Iterator[None]:
    """transformers refuses to save a model loaded from GGUF although its weights are already dequantized floats;
    lift that marker for the duration of the save only."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    is_gguf = quantizer is not None and "gguf" in type(quantizer).__name__.lower()
    is_gguf = is_gguf or (quantizer is None and qconfig is not None and "gguf" in str(qconfig).lower())
    if not is_gguf:
        yield
        return
    had_qconfig = hasattr(config, "quantization_config")
    model.hf_quantizer = None
    if had_qconfig:
        delattr(config, "quantization_config")
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_qconfig:
            config.quantization_config = qconfig


def _print_report(report: MergeReport) -> None:
    print(report)


def export_merged(model: nn.Module, directory: PathLike, tokenizer: Any = None,
                  report: Optional[Callable[[MergeReport], None]] = _print_report, merge_target: str = "dequantized",
                  original: Optional[OriginalWeights] = None, probe: Any = None) -> Path:
    """Write ``model`` with its adapters merged, without changing ``model``.

    Over a quantized base (QLoRA) ``merge_target`` chooses the merged weights (``lightning_lora.quantize_merge``):
    ``dequantized`` (default: dequant(Wq) + dW in the base's dtype, what the trained model computed), ``requantized``
    (back into the base's format: a smaller file, which loses most of a LoRA update in 4 bits) or ``original`` (dW
    added to the full-precision weights in ``original``: a safetensors file, ``save_pretrained`` directory, state dict
    or module). The merge's measured ``MergeReport`` is logged at INFO (logger ``lightning_lora.export``) and handed to
    ``report`` (default: printed; None: only logged); ``probe`` (a batch: a tensor or a dict of keyword arguments)
    adds the change of the model's output to it.

    A Hugging Face model is written with ``save_pretrained`` (reload it with ``AutoModel...from_pretrained``), with
    ``tokenizer`` beside it when given, so the directory is a standalone model; any other module as
    ``model.safetensors`` holding its merged state dict. A ``requantized`` export is
    ``quantized_model.safetensors`` holding the quantized weights as their parts (plus ``config.json`` and the
    tokenizer for a Hugging Face model): load it with ``lightning_lora.load_quantized(directory)`` (transformers
    cannot).

    ``directory`` must be new, empty, or a previous merged export (which is replaced atomically); a file or a
    directory holding other files is refused with ``ExportTargetError`` before anything is written, so a user's files
    are never deleted. A failed write (a full disk) raises ``ExportError`` (an ``OSError``) and leaves the previous
    export in place.
    """
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(
            f"export_merged(tokenizer=...) wants a tokenizer object with save_pretrained (e.g. "
            f"AutoTokenizer.from_pretrained(name)), got {type(tokenizer).__name__} {tokenizer!r:.60}."
        )
    check_export_target(directory, MERGED_KIND)
    state, merge_report = _merge(model, merge_target, original, probe)
    from transformers import PreTrainedModel

    with export_directory(directory, MERGED_KIND) as staging:
        if merge_target == "requantized":
            save_quantized(state, staging / QUANTIZED_WEIGHTS)
            if isinstance(model, PreTrainedModel):
                with _gguf_loaded_savable(model):
                    config = copy.copy(model.config)  # as save_pretrained records it: load_quantized builds from it
                    config.architectures = [type(model).__name__]
                    config.save_pretrained(staging)
        elif isinstance(model, PreTrainedModel):
            with _gguf_loaded_savable(model):
                model.save_pretrained(staging, state_dict=state)
        else:
            contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(_untie(contiguous), str(staging / MERGED_WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None and (merge_target == "requantized" or isinstance(model, PreTrainedModel)):
            tokenizer.save_pretrained(staging)
    if merge_report is not None:
        log.info("%s\n  written to %s", merge_report, directory)
        if report is not None:
            report(merge_report)
    return Path(directory)


def _untie(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory; a plain state dict keeps each tied copy under its own key."""
    seen: dict[int, str] = {}
    out = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        out[key] = tensor.clone() if ptr in seen and tensor.numel() else tensor
        seen.setdefault(ptr, key)
    return out
