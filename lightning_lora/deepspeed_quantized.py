"""A quantized base (QLoRA: NF4, int8, int4) under DeepSpeed ZeRO stages 2 and 3: the frozen quantized weights are
kept out of DeepSpeed's hands, whole and the same on every rank, while ZeRO partitions the float32 adapter.

DeepSpeed handles every ``nn.Parameter`` of the module it is given, and a torchao tensor subclass survives none of it:
``deepspeed.initialize`` broadcasts each parameter from rank zero as a ``uint8`` view (``engine._broadcast_model``;
torchao's ``NF4Tensor`` has no ``view(dtype)``), its bf16/fp16 modes cast each one (which dequantizes), ZeRO-3
converts each into a flat partitioned tensor (``Init._convert_to_zero_parameters``) and its hooks gather every
module's parameters around the module's forward. So while DeepSpeed holds the model (``hide_quantized``, called
right after the base is quantized, before ``deepspeed.initialize``), each quantized weight leaves its module's
``_parameters`` and becomes a plain attribute of the same name: ``layer.weight`` still reads it, the layer trains
through it as in one process (``quantize.QuantizedLinear``), and neither DeepSpeed nor ``state_dict`` sees it, so
checkpoints stay adapter-only. As DeepSpeed does for every other parameter, rank zero's copy is broadcast first (each
weight's inner tensors, ``__tensor_flatten__``), so every rank computes with the same base even if the ranks built
or quantized theirs differently.

The quantized base is thus replicated on every rank (Llama-3.1-8B's projections in NF4: 3.4 GiB on each GPU);
ZeRO partitions the adapter, its float32 masters and Adam state, and under ZeRO-3 also the float parameters of the
base (embeddings, norms, layers left unquantized). To shard the NF4 base itself use FSDP2 (``ModelParallelStrategy``),
where torchao's ``NF4Tensor`` is sharded. Exports see the weights as parameters again for their duration
(``visible_quantized``: the merged export dequantizes each and merges in float32, ``sharded_export.merged_tensors``);
``restore_quantized`` puts them back for good once DeepSpeed is done. No Lightning here; ``torch.distributed`` only.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .quantize import is_quantized

_HIDDEN = "_lightning_lora_hidden_quantized"  # per module: {name: Parameter} of the weights kept out of _parameters


def hide_quantized(model: nn.Module, device: Union[str, torch.device, None] = None) -> int:
    """Move every quantized parameter of ``model`` out of its module's ``_parameters`` into a plain attribute of the
    same name (see the module docstring), on ``device`` (DeepSpeed moves the module there, but no longer these);
    then broadcast rank zero's values to every rank (a collective when ``torch.distributed`` is initialized). Returns
    how many weights were hidden; those already hidden are left alone."""
    count = 0
    for module in model.modules():
        names = [n for n, p in module._parameters.items() if p is not None and is_quantized(p)]
        if not names:
            continue
        hidden = module.__dict__.setdefault(_HIDDEN, {})
        for name in names:
            param = module._parameters.pop(name)
            if device is not None and param.device != torch.device(device):
                moved = nn.Parameter(param.detach().to(device), requires_grad=False)
                original = module.__dict__.get("original_module")  # an AdaptedLayer's kept-aside module shares it
                if original is not None and original._parameters.get(name) is param:
                    original._parameters[name] = moved
                param = moved
            hidden[name] = module.__dict__[name] = param
            count += 1
    broadcast_quantized(model)
    return count


def hidden_quantized(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, weight)`` of each quantized weight ``hide_quantized`` holds out of ``model``'s parameters, in module
    order (the same on every rank)."""
    for path, module in model.named_modules():
        for name, param in module.__dict__.get(_HIDDEN, {}).items():
            yield (f"{path}.{name}" if path else name), param


def restore_quantized(model: nn.Module) -> int:
    """Put the weights ``hide_quantized`` took out back into their modules' parameters; returns how many."""
    count = 0
    for module in model.modules():
        for name, param in module.__dict__.pop(_HIDDEN, {}).items():
            if module.__dict__.get(name) is param:
                del module.__dict__[name]
            if module._parameters.get(name) is None:  # not replaced meanwhile
                module._parameters[name] = param
                count += 1
    return count


@contextlib.contextmanager
def visible_quantized(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the hidden quantized weights are ``model``'s parameters again (for an export's
    ``state_dict`` walk and ``merged_weight``); hidden again on exit, without another broadcast."""
    hidden = [(module, dict(module.__dict__[_HIDDEN])) for module in model.modules() if _HIDDEN in module.__dict__]
    restore_quantized(model)
    try:
        yield model
    finally:
        for module, weights in hidden:
            for name, param in weights.items():
                if module._parameters.get(name) is param:
                    del module._parameters[name]
                    module.__dict__[name] = param
            module.__dict__[_HIDDEN] = weights


@contextlib.contextmanager
def gathered_export(model: nn.Module, merged: bool) -> Iterator[Optional[Iterable[tuple[str, Tensor]]]]:
    """``deepspeed_io.gathered_export`` (collective, every rank) with the hidden quantized weights visible, so the
    merged export dequantizes and merges them as any other base weight."""
    from .deepspeed_io import gathered_export as zero_export

    with visible_quantized(model), zero_export(model, merged) as tensors:
        yield tensors


def _inner_tensors(tensor: Tensor) -> Iterator[Tensor]:
    """The plain tensors a tensor subclass is made of (``__tensor_flatten__``, recursively), or ``tensor`` itself."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        yield tensor
        return
    names, _ = tensor.__tensor_flatten__()
    for name in names:
        yield from _inner_tensors(getattr(tensor, name))


@torch.no_grad()
def broadcast_quantized(model: nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
    """Overwrite every rank's hidden quantized weights with rank ``src``'s, inner tensor by inner tensor, in place (a
    collective; nothing to do in one process)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    for _, weight in hidden_quantized(model):
        for inner in _inner_tensors(weight):
            buffer = inner if inner.is_contiguous() else inner.contiguous()
            dist.broadcast(buffer, src, group=group)
            if buffer is not inner:
                inner.copy_(buffer)
