"""Merged export: the base with every update folded in, written as ``save_pretrained`` or a safetensors file."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import PathLike, check_export_target, export_directory
from .methods.base import MergeError
from .quantize import MergeReport, dequantized_merge
from .surgery import adapters, base_state_dict, weight_adapters

log = logging.getLogger(__name__)

MERGED_WEIGHTS = "model.safetensors"
MERGED_KIND = "merged"


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base state dict with every update folded in, computed out of place: the model is not changed.

    Raises ``MergeError`` for inserted adapters and for updates that would put inf/NaN into a weight."""
    return _merge(model)[0]


def _merge(model: nn.Module) -> tuple[dict[str, Tensor], Optional[MergeReport]]:
    """``merged_state_dict``, and the ``MergeReport`` of its quantized layers (merged to the ``dequantized`` target,
    as ``quantize.merge_quantized`` does), or None when no base weight is quantized."""
    layers = {id(layer) for layer in weight_adapters(model, "merge")}
    state = base_state_dict(model)
    dequantized, report = dequantized_merge(model)
    for path, layer in adapters(model).items():
        if id(layer) not in layers:
            continue
        merged = dequantized[path] if path in dequantized else layer.merged_weight()
        if not torch.isfinite(merged).all():
            raise MergeError(f"Merging {path} gives inf/NaN; the adapter has diverged, so no merged model was written.")
        state[f"{path}.weight" if path else "weight"] = merged
    return state, report


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


def export_merged(model: nn.Module, directory: PathLike, tokenizer: Any = None,
                  report: Optional[Callable[[MergeReport], None]] = None) -> Path:
    """Write ``model`` with its adapters merged, without changing ``model``.

    Over a quantized base (QLoRA) the merged weights are the ``dequantized`` target, dequant(Wq) + dW: what the trained
    model computed. Their measured ``MergeReport`` is logged at INFO (logger ``lightning_lora.export``) and handed to
    ``report`` when given.

    A Hugging Face model is written with ``save_pretrained`` (reload it with ``AutoModel...from_pretrained``), with
    ``tokenizer`` beside it when given, so the directory is a standalone model; any other module as
    ``model.safetensors`` holding its merged state dict.

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
    state, merge_report = _merge(model)
    from transformers import PreTrainedModel

    with export_directory(directory, MERGED_KIND) as staging:
        if isinstance(model, PreTrainedModel):
            with _gguf_loaded_savable(model):
                model.save_pretrained(staging, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        else:
            contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(_untie(contiguous), str(staging / MERGED_WEIGHTS), metadata={"format": "pt"})
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
