"""Weighted combinations of LoRA adapters into a new adapter, as PEFT's ``add_weighted_adapter``.

- ``linear``: A and B each a weighted sum (weight ``w * scaling`` split as a square root over the two factors, its
  sign on A); needs equal ranks. A rough approximation of the weighted sum of the updates (the cross terms remain).
- ``cat``: A and B concatenated along the rank: exactly ``sum w_i * scaling_i * B_i A_i``, rank the sum of ranks.
- ``svd``: the exact weighted sum of the updates, truncated to ``svd_rank`` by SVD.
- ``ties`` (Yadav et al. 2023, arXiv 2306.01708): trim each to its ``density`` largest magnitudes, elect a sign per
  entry, average the entries that agree with it (disjoint merge).
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2023, arXiv 2311.03099): drop entries at random (keep with probability
  ``density``) and rescale by ``1 / density``, then a weighted sum or TIES' sign election; ``seed`` makes it repeatable.
- ``magnitude_prune``: trim to ``density`` by magnitude, then the weighted sum.
The ``_svd`` variants (``ties_svd``, ...) apply the same rule to the full updates and truncate by SVD.

The arithmetic is PEFT's (``peft.utils.merge_utils``), op for op, so results equal PEFT's on the same inputs (and,
for DARE, on the same random stream). The result is an ordinary LoRA adapter: it saves, loads, activates and merges
like any other.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from .config import ConfigError, LoRAConfig, _got, _is_real, exact_targets
from .methods.base import AdaptedLayer
from .methods.lora import LoRAEmbeddingUpdate, LoRAUpdate
from .surgery import adapters, check_names, inject

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*FACTOR_TYPES, "cat", *SVD_TYPES)
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def add_weighted_adapter(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    density: Optional[float] = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    seed: Optional[int] = None,
    svd_clamp: Optional[float] = None,
) -> list[str]:
    """Add adapter ``name`` to ``model``: the LoRA adapters ``names`` combined with ``weights`` by
    ``combination_type`` (see the module docstring). ``density`` in (0, 1] is the fraction kept by the trimming and
    dropping types; ``seed`` seeds DARE's random drops in a forked RNG (None: the global stream, as PEFT).
    The new adapter's scaling is 1 (``alpha = r``); it is added inactive, like any later adapter. Every input is
    checked before the model changes. Returns the adapted module paths."""
    names = check_names(model, names)
    if not names:
        raise ConfigError("add_weighted_adapter needs at least one adapter name in names.")
    weights = _check_weights(names, weights)
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type {combination_type!r} is unknown; choose one of {', '.join(COMBINATIONS)}.")
    combination_type = "linear" if len(names) == 1 else combination_type  # as PEFT: one adapter is only scaled
    if combination_type.removesuffix("_svd") in NEEDS_DENSITY:
        if density is None or not _is_real(density) or not 0 < density <= 1:
            raise ConfigError(f"combination_type={combination_type!r} needs density in (0, 1] (the fraction of "
                              f"entries kept, e.g. 0.5), {_got(density)}.")
    elif density is not None and (not _is_real(density) or not 0 < density <= 1):
        raise ConfigError(f"density must be in (0, 1] (the fraction of entries kept, e.g. 0.5), {_got(density)}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', {_got(majority_sign_method)}.")
    layers = _lora_layers(model, names)
    ranks = _new_ranks(layers, names, combination_type, svd_rank)
    if seed is None:
        factors = {path: _combine(layer, names, weights, combination_type, ranks[path], density,
                                  majority_sign_method, svd_clamp) for path, layer in layers.items()}
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            factors = {path: _combine(layer, names, weights, combination_type, ranks[path], density,
                                      majority_sign_method, svd_clamp) for path, layer in layers.items()}
    first: LoRAConfig = next(u.config for layer in layers.values() for n, u in layer.adapters.items() if n in names)
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    patterns = {f"^{re.escape(p)}": r for p, r in ranks.items() if r != rank}
    targets, _ = exact_targets(list(layers), [p for p, _ in model.named_modules()])
    config = dataclasses.replace(first, method="lora", r=rank, alpha=rank, use_rslora=False, target_modules=targets,
                                 exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                                 rank_pattern=patterns, alpha_pattern={k: float(v) for k, v in patterns.items()})
    paths = inject(model, config, seed=0, name=name)
    with torch.no_grad():
        for path, (a, b) in factors.items():
            update = model.get_submodule(path).adapters[name]
            new_a, new_b = _factors(update)
            new_a.copy_(a.reshape(new_a.shape))
            new_b.copy_(b.reshape(new_b.shape))
    return paths


def _check_weights(names: list[str], weights: Sequence[float]) -> list[float]:
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise ConfigError(f"weights must be a list of numbers, one per adapter in names ({len(names)}), {_got(weights)}.")
    weights = list(weights)
    if len(weights) != len(names):
        raise ConfigError(f"weights has {len(weights)} values for {len(names)} adapters ({', '.join(names)}); give "
                          "one weight per adapter name, in the same order.")
    for w in weights:
        if not _is_real(w) or not math.isfinite(w):
            raise ConfigError(f"weights must be finite numbers (negative ones subtract an adapter), {_got(w)}.")
    return [float(w) for w in weights]


def _lora_layers(model: nn.Module, names: list[str]) -> dict[str, AdaptedLayer]:
    """The layers holding any of ``names``; every one of those updates must be plain LoRA on a linear layer or an
    embedding (what PEFT combines; DoRA's magnitude and other methods' factors have no such algebra)."""
    found = {p: a for p, a in adapters(model).items() if isinstance(a, AdaptedLayer) and any(n in a.adapters for n in names)}
    for path, layer in found.items():
        for n in names:
            update = layer.adapters[n] if n in layer.adapters else None
            if update is not None and type(update) not in (LoRAUpdate, LoRAEmbeddingUpdate):
                raise ConfigError(
                    f"Adapter {n!r} is {update.config.method!r} on {path} ({type(update).__name__}); weighted "
                    "combinations take plain LoRA adapters on linear or embedding layers. Leave it out of names."
                )
    return found


def _factors(update: nn.Module) -> tuple[Tensor, Tensor]:
    """(A, B) of a LoRA update: A is (r, in), B is (out, r)."""
    if isinstance(update, LoRAEmbeddingUpdate):
        return update.lora_embedding_A, update.lora_embedding_B
    return update.lora_A.weight, update.lora_B.weight


def _new_ranks(layers: dict[str, AdaptedLayer], names: list[str], combination_type: str,
               svd_rank: Optional[int]) -> dict[str, int]:
    """The new adapter's rank per layer: the common rank (factor types), the sum (cat), or ``svd_rank``/the max."""
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ConfigError(f"svd_rank must be a positive integer such as 8, {_got(svd_rank)}.")
    ranks = {}
    for path, layer in layers.items():
        rs = [layer.adapters[n].r for n in names if n in layer.adapters]
        if combination_type in FACTOR_TYPES:
            if len(set(rs)) != 1:
                raise ConfigError(
                    f"combination_type={combination_type!r} adds the factors A and B themselves, so the adapters need "
                    f"one rank, but on {path} they have ranks {dict(zip([n for n in names if n in layer.adapters], rs))}."
                    " Use 'cat' or 'svd' (any ranks), or combine adapters of one rank."
                )
            ranks[path] = rs[0]
        elif combination_type == "cat":
            ranks[path] = sum(layer.adapters[n].r for n in names if n in layer.adapters)
        else:
            ranks[path] = svd_rank or max(rs)
    return ranks


@torch.no_grad()
def _combine(layer: AdaptedLayer, names: list[str], weights: list[float], combination_type: str, rank: int,
             density: Optional[float], majority_sign_method: str, clamp: Optional[float]) -> tuple[Tensor, Tensor]:
    """The new (A, B) of one layer (PEFT's ``add_weighted_adapter`` for one ``LoraLayer``)."""
    present = [(layer.adapters[n], w) for n, w in zip(names, weights) if n in layer.adapters]
    if combination_type == "cat":
        a = torch.cat([_factors(u)[0] * w * u.scaling for u, w in present], dim=0)
        b = torch.cat([_factors(u)[1] for u, w in present], dim=1)
        full_a = a.new_zeros((rank, *a.shape[1:]))
        full_b = b.new_zeros((b.shape[0], rank, *b.shape[2:]))
        full_a[: a.shape[0]] = a
        full_b[:, : b.shape[1]] = b
        return full_a, full_b
    if combination_type in SVD_TYPES:
        deltas = [_factors(u)[1] @ _factors(u)[0] * u.scaling for u, _ in present]  # B A, (out, in)
        w = torch.tensor([w for _, w in present]).to(deltas[0].device)
        delta = MERGES[combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"](
            deltas, w, density, majority_sign_method)
        u_, s, vh = torch.linalg.svd(delta, full_matrices=True)
        u_ = u_[:, :rank] @ torch.diag(s[:rank])
        vh = vh[:rank, :]
        if clamp is not None:
            hi = torch.quantile(torch.cat([u_.flatten(), vh.flatten()]), clamp)
            u_, vh = u_.clamp(-hi, hi), vh.clamp(-hi, hi)
        return vh, u_
    scaled = [w * u.scaling for u, w in present]
    w_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])
    w_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    a_list, b_list = [_factors(u)[0].detach() for u, _ in present], [_factors(u)[1].detach() for u, _ in present]
    dtype = a_list[0].dtype
    merge = MERGES[combination_type]
    return (merge(a_list, w_a.to(a_list[0].device), density, majority_sign_method).to(dtype),
            merge(b_list, w_b.to(b_list[0].device), density, majority_sign_method).to(dtype))


# -- PEFT's merge_utils, op for op (so that random drops draw the same numbers) ------------------------------------
def _weighted(tensors: Tensor, weights: Tensor) -> Tensor:
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - weights.dim()))


def _magnitude_prune(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude (TIES' trim)."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_drop(tensor: Tensor, density: float) -> Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by ``1 / density``."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(input=tensor, fill_value=density)) / density


def _elect_and_merge(tensors: Tensor, weights: Tensor, method: str) -> Tensor:
    """TIES: the sign with the larger total (or count) per entry, then the mean of the weighted entries of that sign."""
    sign = tensors.sign()
    magnitude = tensors.sum(dim=0) if method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(magnitude >= 0, 1, -1)
    weighted = _weighted(tensors, weights)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _linear(tensors: list[Tensor], weights: Tensor, density: Optional[float], method: str) -> Tensor:
    return _weighted(torch.stack(tensors, dim=0), weights).sum(dim=0)


def _ties(tensors: list[Tensor], weights: Tensor, density: float, method: str) -> Tensor:
    return _elect_and_merge(torch.stack([_magnitude_prune(t, density) for t in tensors], dim=0), weights, method)


def _dare_linear(tensors: list[Tensor], weights: Tensor, density: float, method: str) -> Tensor:
    return _linear([_random_drop(t, density) for t in tensors], weights, density, method)


def _dare_ties(tensors: list[Tensor], weights: Tensor, density: float, method: str) -> Tensor:
    return _elect_and_merge(torch.stack([_random_drop(t, density) for t in tensors], dim=0), weights, method)


def _pruned_linear(tensors: list[Tensor], weights: Tensor, density: float, method: str) -> Tensor:
    return _linear([_magnitude_prune(t, density) for t in tensors], weights, density, method)


MERGES = {"linear": _linear, "ties": _ties, "dare_linear": _dare_linear, "dare_ties": _dare_ties,
          "magnitude_prune": _pruned_linear}
