"""The Lightning classes and helpers the glue needs, from whichever Lightning packages are installed.

Lightning ships as ``pytorch_lightning`` and as ``lightning`` (``lightning.pytorch``); each Trainer accepts only its own
package's callbacks. Classes built on the bases here are instances of both packages' classes when both are installed,
so one ``LoRACallback`` serves either Trainer.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Optional

from lightning_utilities.core.overrides import is_overridden as _is_overridden
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn  # shared by both packages

__all__ = ["PACKAGES", "CALLBACK_BASES", "CHECKPOINT_IO_BASES", "is_overridden", "is_torch_checkpoint_io",
           "unsupported_strategy", "is_model_parallel", "is_deepspeed", "rank_zero_info", "rank_zero_warn"]


def _import(name: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# (trainer package, fabric package) pairs, pytorch_lightning first.
_PAIRS = [(pl, fabric) for pl, fabric in ((_import("pytorch_lightning"), _import("lightning_fabric")),
                                          (_import("lightning.pytorch"), _import("lightning.fabric")))
          if pl is not None and fabric is not None]
if not _PAIRS:
    raise ImportError("lightning_lora's callback needs Lightning: pip install pytorch-lightning (or lightning).")

PACKAGES: tuple[ModuleType, ...] = tuple(pl for pl, _ in _PAIRS)
"""The importable Lightning trainer packages: ``pytorch_lightning`` and/or ``lightning.pytorch``."""

CALLBACK_BASES: tuple[type, ...] = tuple(pl.Callback for pl in PACKAGES)
CHECKPOINT_IO_BASES: tuple[type, ...] = tuple(fabric.plugins.io.CheckpointIO for _, fabric in _PAIRS)
_TORCH_CHECKPOINT_IO: tuple[type, ...] = tuple(fabric.plugins.io.TorchCheckpointIO for _, fabric in _PAIRS)
_LIGHTNING_MODULES: tuple[type, ...] = tuple(pl.LightningModule for pl in PACKAGES)


def is_overridden(hook: str, pl_module: Any) -> bool:
    """Whether the LightningModule's class (of either package) overrides ``hook``."""
    return any(isinstance(pl_module, base) and _is_overridden(hook, pl_module, base) for base in _LIGHTNING_MODULES)


def is_torch_checkpoint_io(io: Any) -> bool:
    """Whether ``io`` is Lightning's plain ``torch.save`` checkpoint writer (which writes the path it is given)."""
    return isinstance(io, _TORCH_CHECKPOINT_IO)


def _strategy_name(strategy: Any, names: tuple[str, ...]) -> Optional[str]:
    for pl in PACKAGES:
        for name in names:
            cls = getattr(pl.strategies, name, None)
            if cls is not None and isinstance(strategy, cls):
                return name
    return None


def unsupported_strategy(strategy: Any) -> Optional[str]:
    """The class name of ``strategy`` if the callback does not support it (FSDP1's ``FSDPStrategy``), else None.
    ``ModelParallelStrategy`` (FSDP2) and ``DeepSpeedStrategy`` are supported: see ``is_model_parallel``,
    ``is_deepspeed``."""
    return _strategy_name(strategy, ("FSDPStrategy",))


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``DeepSpeedStrategy``, of either package."""
    return _strategy_name(strategy, ("DeepSpeedStrategy",)) is not None


def is_model_parallel(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 / DTensor), of either package."""
    return _strategy_name(strategy, ("ModelParallelStrategy",)) is not None
