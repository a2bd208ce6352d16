"""Hot-swap: replace a loaded LoRA adapter's weights with another adapter's, in place, so that a compiled model keeps
its compiled graphs (``torch.compile`` guards on tensor shapes, dtypes and Python constants, never on values).

A swapped-in adapter may have a smaller rank (its factors are zero-padded to the loaded rank: the padded rank columns
add nothing) and another alpha (its scaling is folded into B, since the loaded scaling is a Python constant of the
compiled graph); layers it does not target get a zero B. A larger rank or a layer the loaded adapter lacks would
change shapes: load the first adapter with the largest rank and every target the others need (e.g. ``rank_pattern``).
LoRA only (its factors pad; other methods' do not), and not while merged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from .atomic import PathLike
from .config import DEFAULT_ADAPTER, ConfigError, LoRAConfig
from .fingerprint import base_fingerprint, compare_fingerprints
from .io import FINGERPRINT_KEY, AdapterFileError, read_adapter
from .methods.base import AdaptedLayer
from .methods.lora import (
    LoRAConvUpdate,
    LoRAEmbeddingUpdate,
    LoRAUpdate,
    rank_and_alpha,
)
from .surgery import adapters, check_names

LORA_UPDATES = (LoRAUpdate, LoRAEmbeddingUpdate, LoRAConvUpdate)


@dataclasses.dataclass
class _Source:
    """One layer's incoming factors: A (r, ...), B (out, r, ...) and the scaling they were trained with."""

    a: Tensor
    b: Tensor
    scaling: float


def hotswap_adapter(model: nn.Module, source: Union[PathLike, str], name: str = DEFAULT_ADAPTER,
                    check_base: bool = True) -> None:
    """Overwrite loaded LoRA adapter ``name`` with ``source``: an adapter directory (ours or PEFT's) or the name of
    another LoRA adapter loaded in ``model``. In place: no tensor changes shape, dtype or device, so compiled graphs
    stay valid. Everything is checked before the first write (the model is unchanged on error)."""
    check_names(model, name)
    layers = {p: a for p, a in adapters(model).items() if isinstance(a, AdaptedLayer) and name in a.adapters}
    for path, layer in layers.items():
        update = layer.adapters[name]
        if type(update) not in LORA_UPDATES or update.config.method != "lora":
            raise ConfigError(f"Adapter {name!r} is {update.config.method!r} on {path}; hot-swap replaces LoRA "
                              "factors only. Load the new adapter with load_adapter(model, path, name=...) instead.")
        if update.merged:
            raise ConfigError(f"Adapter {name!r} is merged into the weights; unmerge(model) before hot-swapping it.")
    incoming = _from_model(model, source) if isinstance(source, str) and source in _names(model) else \
        _from_directory(model, Path(source), check_base)
    extra = sorted(set(incoming) - set(layers))
    if extra:
        raise ConfigError(
            f"{source} adapts {', '.join(extra[:5])}, which loaded adapter {name!r} does not; a hot-swap cannot add "
            "layers. Load the first adapter with every target the swapped-in ones need."
        )
    plan = []
    for path, layer in layers.items():
        update = layer.adapters[name]
        a, b = _factors(update)
        new = incoming.get(path)
        if new is None:
            plan.append((a, torch.zeros_like(a), b, torch.zeros_like(b)))  # not targeted: no update
            continue
        r_new, r_old = new.a.shape[0], a.shape[0]
        if new.a.shape[1:] != a.shape[1:] or new.b.shape[0] != b.shape[0] or new.b.shape[2:] != b.shape[2:]:
            raise AdapterFileError(
                f"{source}: {path} has factors {tuple(new.a.shape)}/{tuple(new.b.shape)}, the loaded adapter "
                f"{tuple(a.shape)}/{tuple(b.shape)}: it was trained for a base of other shapes."
            )
        if r_new > r_old:
            raise ConfigError(
                f"{source} has rank {r_new} on {path}, more than the loaded adapter {name!r} (rank {r_old}); a "
                f"hot-swap pads to the loaded rank and cannot grow it. Load the first adapter with rank >= {r_new}."
            )
        padded_a = torch.zeros_like(a)
        padded_b = torch.zeros_like(b)
        padded_a[:r_new] = new.a
        padded_b[:, :r_new] = new.b * (new.scaling / update.scaling)  # the loaded scaling is a compiled constant
        plan.append((a, padded_a, b, padded_b))
    with torch.no_grad():
        for a, new_a, b, new_b in plan:
            a.copy_(new_a)
            b.copy_(new_b)


def _names(model: nn.Module) -> set[str]:
    return {n for a in adapters(model).values() if isinstance(a, AdaptedLayer) for n in a.adapters}


def _factors(update: nn.Module) -> tuple[Tensor, Tensor]:
    if isinstance(update, LoRAEmbeddingUpdate):
        return update.lora_embedding_A, update.lora_embedding_B
    return update.lora_A.weight, update.lora_B.weight


def _from_model(model: nn.Module, other: str) -> dict[str, _Source]:
    found = {}
    for path, layer in adapters(model).items():
        if isinstance(layer, AdaptedLayer) and other in layer.adapters:
            update = layer.adapters[other]
            if type(update) not in LORA_UPDATES or update.config.method != "lora":
                raise ConfigError(f"Adapter {other!r} is {update.config.method!r}; only LoRA adapters hot-swap.")
            a, b = _factors(update)
            found[path] = _Source(a.detach().clone(), b.detach().clone(), update.scaling)
    return found


def _from_directory(model: nn.Module, directory: Path, check_base: bool) -> dict[str, _Source]:
    config, tensors, metadata = read_adapter(directory)
    if not isinstance(config, LoRAConfig) or config.method != "lora":
        raise ConfigError(f"{directory} holds a {config.method!r} adapter; only LoRA adapters hot-swap (load it with "
                          "load_adapter(model, path, name=...) instead).")
    saved = metadata.get(FINGERPRINT_KEY)
    mismatch = compare_fingerprints(saved, base_fingerprint(model)) if check_base and saved else None
    if mismatch:
        raise AdapterFileError(f"{directory} was trained on a different base model: {mismatch}. Load the base it was "
                               "trained on, or pass check_base=False if you changed the base on purpose.")
    found: dict[str, _Source] = {}
    for key, tensor in tensors.items():
        for a_name, b_name in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if key.endswith("." + a_name):
                path = key[: -len(a_name) - 1]
                b = tensors.get(f"{path}.{b_name}")
                if b is None:
                    raise AdapterFileError(f"{directory}: {key} has no {b_name} beside it; re-export the adapter.")
                r, alpha = rank_and_alpha(config, path)
                if tensor.shape[0] != r:
                    raise AdapterFileError(f"{directory}: {key} has rank {tensor.shape[0]}, but its config says r={r} "
                                           "there; the config does not match its weights. Re-export the adapter.")
                found[path] = _Source(tensor, b, config.scaling(r, alpha))
    unknown = sorted(k for k in tensors if not any(k.startswith(p + ".") for p in found))
    if unknown:
        raise AdapterFileError(f"{directory} holds tensors a LoRA hot-swap cannot place: {unknown[:5]}.")
    return found
