"""Merged export of a model sharded with FSDP2, without the full model on any rank.

``merged_tensors`` walks the base state dict one tensor at a time: it gathers that tensor (an all-gather of its
shards: a collective every rank runs, in the same order), folds in the tensor's adapter update in float32 (the
adapted layer's own ``merged_weight``, so every method, DoRA included, and a quantized base's dequantization are the
single-process code; a mergeable inserted adapter's tensors, BitFit's biases, replace the base's), and hands the
result over on the CPU. ``write_merged`` (rank zero) writes the tensors into
``save_pretrained``'s layout: ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_size`` bytes plus
``model.safetensors.index.json`` (one ``model.safetensors`` when everything fits one shard), ``config.json`` and
``generation_config.json``, and frees each shard once written.

Memory per rank: the rank's own shards, one whole tensor and its float32 merge (on the GPU), and on rank zero one
file shard on the CPU. Adapter tensors must be whole meanwhile (``distributed.gathered_adapters``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import PathLike, check_export_target, export_directory, write_json
from .distributed import full_tensor, is_dtensor
from .export import MERGED_KIND, MERGED_WEIGHTS
from .methods.base import AdaptedLayer, dense
from .methods.inserted import InsertedAdapter
from .surgery import adapters, base_state_dict, weight_adapters

INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5 * 2**30


def merged_tensors(model: nn.Module, gathered: Optional[Callable[[Tensor], ContextManager[Tensor]]] = None
                   ) -> Iterator[tuple[str, Tensor]]:
    """``(key, tensor)`` of ``model``'s merged state dict, one tensor at a time, whole, on the CPU, in the base
    state dict's order; a tied tensor is given once, under its first key (as ``save_pretrained`` writes it).

    A collective: every rank iterates it to the end (a rank that writes nothing just drains it). Raises
    ``MergeError`` (before gathering anything) for inserted adapters and tied adapted weights, and for a merged
    weight that is not finite. ``gathered(parameter)`` lends a base tensor whole and dense within its block: FSDP2's
    all-gather by default; DeepSpeed's ZeRO-3 gather (``deepspeed_io``) is the other."""
    from .methods.base import MergeError

    gathered = gathered or _gathered_whole

    layers = {f"{path}.weight" if path else "weight": layer for path, layer in adapters(model).items()
              if isinstance(layer, AdaptedLayer)}
    weight_adapters(model, "merge")  # refuses inserted (but mergeable: BitFit) and tied adapters up front
    replaced = {f"{path}.{key}" if path else key: value for path, adapter in adapters(model).items()
                if isinstance(adapter, InsertedAdapter) for key, value in adapter.merged_tensors().items()}
    first: dict[int, str] = {}  # a tied Parameter's first name (state_dict() detaches, so tie by the Parameter)
    for name, param in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(param), name)
    tied = {name for name, param in model.named_parameters(remove_duplicate=False) if first[id(param)] != name}
    own = model.state_dict(keep_vars=True)  # the Parameters themselves: a ZeRO-3 gather needs them
    for key in base_state_dict(model):
        if key in tied:
            continue
        if key in replaced:  # BitFit's trained bias (whole within gathered_adapters) replaces the base's
            yield key, replaced[key].detach().cpu()
            continue
        with gathered(own[key]) as whole:
            layer = layers.get(key)
            if layer is not None:
                whole = _merged(layer, whole)
                if not torch.isfinite(whole).all():
                    raise MergeError(f"Merging {key.removesuffix('.weight')} gives inf/NaN; the adapter has diverged, "
                                     "so no merged model was written.")
            value = whole.to("cpu", copy=True)  # never the model's own storage, which a gather lends only meanwhile
        del whole
        yield key, value


@contextlib.contextmanager
def _gathered_whole(tensor: Tensor) -> Iterator[Tensor]:
    """FSDP2 (or no sharding): ``tensor`` all-gathered and dense, for ``merged_tensors``."""
    yield _gathered_dense(tensor.detach())


def _gathered_dense(tensor: Tensor) -> Tensor:
    """``tensor`` whole and plain: a sharded quantized weight (NF4 under FSDP2) is gathered in its format and
    dequantized whole, since a shard's block metadata is the full tensor's."""
    return dense(_gathered_nf4(tensor) if _evenly_sharded_nf4(tensor) else full_tensor(tensor))


def _evenly_sharded_nf4(tensor: Tensor) -> bool:
    if not is_dtensor(tensor) or type(tensor.to_local()).__name__ != "NF4Tensor":
        return False
    from torch.distributed.tensor import Shard

    return tuple(tensor.placements) == (Shard(0),) and tensor.shape[0] % tensor.device_mesh.size() == 0


def _gathered_nf4(tensor: Tensor) -> Tensor:
    """A dim-0 sharded NF4 DTensor whole, as torchao's NF4 all-gather builds it (each sharded inner tensor gathered,
    the rest kept), but with blocking ``all_gather_into_tensor`` calls: ``full_tensor()`` goes through functional
    collectives, whose pending inner tensors corrupted the heap of 2-process gloo runs (``malloc(): unaligned tcache
    chunk detected``, now and then while a gathered weight was dequantized)."""
    import torch.distributed as dist
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (
        _INNER_TENSOR_NAMES_FOR_SHARDING, NF4Tensor, construct_nf4_args)

    local, group = tensor.to_local(), tensor.device_mesh.get_group()
    gathered: dict = {"size": tensor.shape}
    for name in _INNER_TENSOR_NAMES_FOR_SHARDING:
        part = getattr(local, name).contiguous()
        whole = part.new_empty((part.shape[0] * dist.get_world_size(group), *part.shape[1:]))
        dist.all_gather_into_tensor(whole, part, group=group)
        gathered[name] = whole
    return NF4Tensor(*construct_nf4_args(local, gathered))


def _merged(layer: AdaptedLayer, weight: Tensor) -> Tensor:
    """``layer.merged_weight()`` with ``weight`` (the gathered base) standing in for the layer's sharded one."""
    sharded = layer._parameters["weight"]
    layer._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    try:
        return layer.merged_weight()
    finally:
        layer._parameters["weight"] = sharded


def write_merged(model: nn.Module, directory: PathLike, tensors: Iterable[tuple[str, Tensor]], tokenizer: Any = None,
                 max_shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Write ``tensors`` (from ``merged_tensors``) into ``directory`` in ``save_pretrained``'s layout, with
    ``model``'s config (and ``tokenizer``); atomic like ``export_merged`` (staged, then swapped in). Rank zero only.
    The other ranks drain their own ``merged_tensors`` meanwhile; if this raises, the caller drains ``tensors`` too."""
    check_export_target(directory, MERGED_KIND)
    with export_directory(directory, MERGED_KIND) as staging:
        written: list[tuple[str, list[str]]] = []
        buffer: dict[str, Tensor] = {}
        size = total = 0

        def flush() -> None:
            name = f".shard-{len(written):05d}.safetensors"
            save_file(buffer, str(staging / name), metadata={"format": "pt"})
            written.append((name, list(buffer)))
            buffer.clear()

        for key, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if buffer and size + nbytes > max_shard_size:
                flush()
                size = 0
            buffer[key] = tensor.contiguous()
            size += nbytes
            total += nbytes
        if buffer or not written:
            flush()
        if len(written) == 1:
            os.rename(staging / written[0][0], staging / MERGED_WEIGHTS)
        else:
            weight_map = {}
            for i, (name, keys) in enumerate(written, 1):
                final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
                os.rename(staging / name, staging / final)
                weight_map.update({key: final for key in keys})
            write_json(staging / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_configs(model, staging, tokenizer)
    return Path(directory)


def _write_configs(model: nn.Module, directory: Path, tokenizer: Any) -> None:
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "save_pretrained", None)):
        config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if generation is not None and can_generate():
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def read_merged(directory: PathLike) -> dict[str, Tensor]:
    """All tensors of a merged export (one file or ``save_pretrained`` shards), for checks and tests."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / INDEX
    if not index.exists():
        return load_file(directory / MERGED_WEIGHTS)
    files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return {k: v for name in files for k, v in load_file(directory / name).items()}


def drain(tensors: Optional[Iterable[Any]]) -> None:
    """Run what is left of a collective iterator (``merged_tensors``) so every rank finishes its gathers."""
    for _ in tensors or ():
        pass
