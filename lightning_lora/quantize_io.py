"""Quantized weights in safetensors files: the ``requantized`` merged export, and how to load it back.

safetensors stores plain tensors only, so each quantized weight is written as its inner tensors (torchao's
``__tensor_flatten__``: for NF4 the packed 4-bit codes and the quantized scales) under ``<key>::<inner name>``, and the
file's metadata records, per weight, its type and its non-tensor attributes as tagged JSON (never pickle: loading runs
no code from the file). ``load_quantized`` rebuilds the tensor subclasses and puts them into a model, replacing each
quantized ``nn.Linear`` by a ``FrozenQuantizedLinear`` (the same dequantize-and-matmul path that trained the adapter).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import fingerprint
from .quantize import FrozenQuantizedLinear, _register_dequantizers, dequantize, is_quantized

QUANTIZED_KEY = "lightning_lora.quantized"  # safetensors metadata: {key: {"type", "inner", "attributes", "shape"}}
SEPARATOR = "::"
QUANTIZED_WEIGHTS = "quantized_model.safetensors"  # not model.safetensors: transformers must not take it for its own


def _quantized_types() -> dict[str, type]:
    from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    from .int4 import PackedInt4Tensor

    return {t.__name__: t for t in (NF4Tensor, Int8Tensor, IntxUnpackedToInt8Tensor, PackedInt4Tensor)}


def _encode(value: Any) -> Any:
    """Tagged JSON for the attribute values torchao's tensors carry (no pickle, so loading runs no code)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": None}  # where to put it is the loader's choice
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and type(value).__name__ == "SubclassTensorArgs":
        return {"SubclassTensorArgs": [_encode(getattr(value, f.name)) for f in dataclasses.fields(value)]}
    raise TypeError(f"cannot store a quantized weight's attribute {value!r} ({type(value).__name__})")


def _decode(value: Any, device: torch.device) -> Any:
    if isinstance(value, list):
        return [_decode(v, device) for v in value]
    if not isinstance(value, dict):
        return value
    ((tag, inner),) = value.items()
    if tag == "dtype":
        dtype = getattr(torch, inner)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{inner!r} is not a torch dtype")
        return dtype
    if tag == "device":
        return device
    if tag == "size":
        return torch.Size(inner)
    if tag == "tuple":
        return tuple(_decode(v, device) for v in inner)
    if tag == "dict":
        return {k: _decode(v, device) for k, v in inner.items()}
    if tag == "SubclassTensorArgs":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import SubclassTensorArgs

        return SubclassTensorArgs(*[_decode(v, device) for v in inner])
    raise ValueError(f"unknown tag {tag!r}")


def flatten_quantized(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``state`` as plain tensors (quantized weights split into their inner tensors) and the metadata to rebuild it."""
    tensors, described = {}, {}
    for key, tensor in state.items():
        if not is_quantized(tensor):
            tensors[key] = tensor
            continue
        names, attributes = tensor.__tensor_flatten__()
        for name in names:
            tensors[f"{key}{SEPARATOR}{name}"] = getattr(tensor, name)
        described[key] = {"type": type(tensor).__name__, "inner": list(names), "attributes": _encode(attributes),
                          "shape": list(tensor.shape)}
    return tensors, described


def save_quantized(state: dict[str, Tensor], path: Union[str, Path], metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``state`` (plain and quantized tensors) to the safetensors file ``path``."""
    tensors, described = flatten_quantized(state)
    seen: set[int] = set()
    plain = {}
    for key, tensor in tensors.items():  # safetensors refuses shared memory: copy tied tensors
        tensor = tensor.detach().contiguous().cpu()
        plain[key] = tensor.clone() if tensor.numel() and tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    save_file(plain, str(path), metadata={**(metadata or {}), "format": "pt", QUANTIZED_KEY: json.dumps(described)})


def read_quantized(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
    """The state dict in a file written by ``save_quantized`` (or a requantized merged export directory), with its
    quantized weights rebuilt as torchao tensors on ``device``."""
    path = Path(path)
    if path.is_dir():
        path = path / QUANTIZED_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: load_quantized reads a requantized merged export "
                                "(export_merged(..., merge_target='requantized')); load other exports with "
                                "from_pretrained or safetensors.torch.load_file.")
    device = torch.device(device)
    _register_dequantizers()
    types = _quantized_types()
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        described = json.loads((f.metadata() or {}).get(QUANTIZED_KEY, "null"))
        if described is None:
            raise ValueError(f"{path} holds no quantized weights (no {QUANTIZED_KEY!r} metadata); it is a plain "
                             "safetensors file: load it with safetensors.torch.load_file or from_pretrained.")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    state = {k: v for k, v in tensors.items() if SEPARATOR not in k}
    for key, info in described.items():
        cls = types.get(info["type"])
        if cls is None:
            raise ValueError(f"{path}: {key} is a {info['type']}, which this version cannot rebuild (known: "
                             f"{sorted(types)}).")
        inner = {name: tensors[f"{key}{SEPARATOR}{name}"] for name in info["inner"]}
        shape = torch.Size(info["shape"])
        stride = tuple(torch.empty(shape, device="meta").stride())
        state[key] = cls.__tensor_unflatten__(inner, _decode(info["attributes"], device), shape, stride)
    return state


def load_quantized(path: Union[str, Path], model: Optional[nn.Module] = None,
                   device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a ``requantized`` merged export (``export_merged(..., merge_target="requantized")``) into ``model``, or,
    when ``model`` is None and the directory holds a transformers ``config.json``, into a model of that architecture
    built here. Each quantized weight's ``nn.Linear`` becomes a ``FrozenQuantizedLinear`` computing
    ``x @ dequant(W).T + b``; every other tensor loads as usual (strictly: missing or unexpected keys are an error).
    Returns the model, in eval mode."""
    path = Path(path)
    state = read_quantized(path, device)
    if model is None:
        model = _model_from_config(path if path.is_dir() else path.parent)
    problems = []
    for key, weight in state.items():
        if not is_quantized(weight):
            continue
        path_, _, leaf = key.rpartition(".")
        module = model.get_submodule(path_) if leaf == "weight" else None
        if type(module) is nn.Linear and tuple(module.weight.shape) == tuple(weight.shape):
            parent, _, name = path_.rpartition(".")
            layer = FrozenQuantizedLinear(module, weight)
            layer.source_sample = fingerprint.sample(dequantize(weight))  # what base_fingerprint reads
            setattr(model.get_submodule(parent), name, layer)
        elif not isinstance(module, FrozenQuantizedLinear):
            problems.append(f"{key} ({tuple(weight.shape)}) is quantized, but the model's {path_} is "
                            f"{type(module).__name__ if module is not None else 'missing'}")
    if problems:
        raise ValueError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems[:4]) + ".")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}.")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(device).eval()


def _is_tied(model: nn.Module, name: str) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False)) and name.endswith("lm_head.weight")


def _model_from_config(directory: Path) -> nn.Module:
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} has no config.json, so its architecture is unknown: pass model= (the base "
                         "model, or one built from its config) to load_quantized.")
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None:
        raise ValueError(f"{directory}/config.json names no transformers architecture ({architecture!r}); pass "
                         "model= to load_quantized.")
    return cls(config)
