"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B trains at ``ratio`` times A's learning rate.

Applied to whatever optimizers the user's ``configure_optimizers`` built, without changing it: every parameter group
that holds B parameters is split, and those move to a new group (appended, so the indices of the user's groups do not
move) with the same options and ``lr * ratio``; the LR schedulers of that optimizer get the new group's entry in each
per-group list (``base_lrs`` scaled, ``lr_lambdas`` copied, ...), so a schedule keeps B at ``ratio`` times A's rate
at every step. As PEFT's ``create_loraplus_optimizer``: B is a ``lora_B`` tensor or a 1-D adapter tensor (DoRA's
magnitude), and both factors of an embedding's adapter train at ``embedding_lr`` (absolute, 1e-6 by default).
Parameters outside the adapters keep their group. The split is deterministic, so a resumed run's optimizer and
scheduler state (saved after the split) load into the same layout.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_lora.config import ConfigError
from lightning_lora.methods.base import AdaptedLayer

EMBEDDING_LR = 1e-6  # PEFT's loraplus_lr_embedding default
# Per-group lists that schedulers keep: scaled with the learning rate, or copied for the new group
_SCALED_LISTS = ("base_lrs", "_last_lr", "max_lrs")
_COPIED_LISTS = ("lr_lambdas", "min_lrs")
_SCALED_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # in a group's dict (OneCycleLR, CyclicLR keep these)


def loraplus_rates(adapters: dict[str, nn.Module], ratio: float, embedding_lr: Optional[float]) -> dict[int, tuple]:
    """``id(param) -> ("ratio", ratio)`` for B parameters and ``("absolute", lr)`` for embedding adapters."""
    rates: dict[int, tuple] = {}
    for adapter in adapters.values():
        if not isinstance(adapter, AdaptedLayer):
            continue
        embedding = adapter.kind.family == "embedding"
        for name, param in adapter.adapters.named_parameters():
            if embedding:
                rates[id(param)] = ("absolute", EMBEDDING_LR if embedding_lr is None else embedding_lr)
            elif ".lora_B." in f".{name}." or param.dim() == 1:
                rates[id(param)] = ("ratio", ratio)
    return rates


def _scheduler_parts(scheduler: Any) -> Iterable[Any]:
    """A scheduler and the ones it chains (SequentialLR, ChainedScheduler)."""
    yield scheduler
    for inner in getattr(scheduler, "_schedulers", []) or []:
        yield from _scheduler_parts(inner)


def split_groups(optimizer: Optimizer, schedulers: list[Any], rates: dict[int, tuple]) -> int:
    """Move the parameters in ``rates`` out of ``optimizer``'s groups into new groups with their rates, and extend
    ``schedulers`` (those of this optimizer) to match; returns how many groups were added."""
    original = list(optimizer.param_groups)
    added = 0
    for index, group in enumerate(original):
        by_rate: dict[tuple, list[nn.Parameter]] = {}
        for param in group["params"]:
            if id(param) in rates:
                by_rate.setdefault(rates[id(param)], []).append(param)
        if not by_rate:
            continue
        moved = {id(p) for params in by_rate.values() for p in params}
        group["params"] = [p for p in group["params"] if id(p) not in moved]
        for (kind, value), params in by_rate.items():
            factor = value if kind == "ratio" else (value / group["lr"] if group["lr"] else 0.0)
            new_group = {k: v for k, v in group.items() if k != "params"}
            for key in _SCALED_KEYS:
                if isinstance(new_group.get(key), (int, float, torch.Tensor)):  # a tensor lr (capturable) too
                    new_group[key] = new_group[key] * factor
            if kind == "absolute":
                new_group["lr"] = value
            optimizer.add_param_group({**new_group, "params": params})
            extended: set[int] = set()  # chained schedulers may share a list (SequentialLR's _last_lr)
            for scheduler in (part for s in schedulers for part in _scheduler_parts(s)):
                _extend_scheduler(scheduler, index, factor, len(original) + added, extended)
            added += 1
    return added


def _extend_scheduler(scheduler: Any, source: int, factor: float, groups_before: int, extended: set[int]) -> None:
    """Give ``scheduler``'s per-group lists an entry for the appended group, derived from group ``source``."""
    for name in _SCALED_LISTS + _COPIED_LISTS:
        values = getattr(scheduler, name, None)
        if not isinstance(values, list) or id(values) in extended:
            continue
        extended.add(id(values))
        if len(values) != groups_before:
            raise ConfigError(
                f"LoRA+ cannot extend {type(scheduler).__name__}.{name} (it has {len(values)} entries for "
                f"{groups_before} parameter groups); build the LoRA+ groups in configure_optimizers yourself and "
                "leave loraplus_lr_ratio unset."
            )
        values.append(values[source] * factor if name in _SCALED_LISTS else values[source])


def apply_loraplus(trainer: Any, adapters: dict[str, nn.Module], ratio: float, embedding_lr: Optional[float]) -> None:
    """Split the Trainer's optimizers' groups for LoRA+ and extend their LR schedulers (see the module docstring)."""
    rates = loraplus_rates(adapters, ratio, embedding_lr)
    for optimizer in trainer.optimizers:
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
        split_groups(optimizer, schedulers, rates)
