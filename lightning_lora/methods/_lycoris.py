"""What LoHa and LoKr (the LyCORIS family, arXiv 2309.14859) share: the layers they adapt, their common options
(``r``, ``alpha``, ``rank_dropout``, ``module_dropout``, ``rank_pattern``/``alpha_pattern``), PEFT's
``adapter_config.json`` around each method's own fields, and the dropouts of the update (module dropout, then PEFT's
rank dropout mask).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import ConfigError, _pattern_map, _positive_int, _positive_real, _probability, exact_targets
from .base import base_kind

log = logging.getLogger(__name__)

# The options both methods have, in the order they stand in PEFT's config, around the method's own options.
COMMON_HEAD = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "r", "alpha",
               "rank_dropout", "module_dropout")
COMMON_TAIL = ("rank_pattern", "alpha_pattern")


def check_common(config: Any) -> None:
    """Check and normalize the shared options in place (``r``, ``alpha``, the two dropouts, the two patterns)."""
    config.r = _positive_int("r", config.r)
    config.alpha = _positive_real("alpha", config.alpha)
    config.rank_dropout = _probability("rank_dropout", config.rank_dropout)
    config.module_dropout = _probability("module_dropout", config.module_dropout)
    config.rank_pattern = _pattern_map("rank_pattern", config.rank_pattern, _positive_int)
    config.alpha_pattern = _pattern_map("alpha_pattern", config.alpha_pattern, _positive_real)


def peft_file_dict(config: Any, name: str, layers: Mapping[str, Any], module_paths: Iterable[str],
                   model_info: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """PEFT's ``adapter_config.json``: the exact adapted paths, the method's own ``fields`` after the shared
    options, per-path ranks/alphas that differ as patterns. ``name`` ("LoHa") names the method in the warning."""
    targets, key = exact_targets(list(layers), module_paths)
    conv1d = sorted(p for p, layer in layers.items() if layer.kind.fan_in_fan_out)
    if conv1d:
        log.warning("lightning_lora: PEFT's %s has no transformers Conv1D layers (%s, ...); this adapter file "
                    "loads in lightning_lora only", name, conv1d[0])
    updates = {path: next(iter(layer.adapters.values())) for path, layer in layers.items()}
    return {"peft_type": config.PEFT_TYPE, **model_info, "r": config.r, "alpha": config.alpha,
            "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout, **fields,
            "target_modules": targets, "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None, "modules_to_save": None, "inference_mode": True,
            "rank_pattern": {key(p): u.r for p, u in sorted(updates.items()) if u.r != config.r},
            "alpha_pattern": {key(p): u.alpha for p, u in sorted(updates.items()) if u.alpha != config.alpha}}


def peft_options(data: Mapping[str, Any], own: Iterable[str]) -> dict[str, Any]:
    """The options of a PEFT config that are set: the shared ones and the method's ``own``; refuses
    ``modules_to_save`` and a config without ``target_modules``."""
    if data.get("modules_to_save"):
        raise ConfigError("PEFT adapter uses modules_to_save, which lightning_lora does not support yet.")
    if data.get("target_modules") is None:
        raise ConfigError("PEFT config has no target_modules; set them to the module names, e.g. ['q_proj'].")
    return {k: data[k] for k in (*COMMON_HEAD, *own, *COMMON_TAIL) if data.get(k) is not None}


def supports_linear_or_conv(module: nn.Module) -> bool:
    """Linear layers and 1-D/2-D convolutions, as in PEFT (plus GPT-2's ``Conv1D``, which PEFT's LoHa/LoKr lack)."""
    kind = base_kind(module)
    return kind is not None and (kind.family == "linear" or isinstance(module, (nn.Conv1d, nn.Conv2d)))


def skip_module(update: Any) -> bool:
    """Module dropout: in training, skip the whole update with probability ``module_dropout``. PEFT draws this
    before the rank mask, so one seed gives both the same masks."""
    return bool(update.training and update.module_dropout and torch.rand(1).item() <= update.module_dropout)


def rank_keep(update: Any, out: Tensor, rescale: bool) -> Optional[Tensor]:
    """Rank dropout: in training, a 0/1 mask over the output rows (rescaled by the kept fraction if ``rescale``);
    None when nothing is dropped."""
    if not (update.training and update.rank_dropout):
        return None
    keep = (torch.rand(update.weight_shape[0], device=out.device) > update.rank_dropout).to(out.dtype)
    return keep / keep.mean().clamp_min(1e-12) if rescale else keep


def conv_update(update: Any, layer: Any, x: Tensor, out: Tensor, keep: Optional[Tensor]) -> Tensor:
    """``out`` plus the convolution of ``x`` with the update's kernel (output channels masked by ``keep``)."""
    delta = update.delta_weight(layer).to(out.dtype)
    if keep is not None:
        delta = delta * keep.view(-1, *[1] * (delta.dim() - 1))
    return out + layer.original_module._conv_forward(x.to(out.dtype), delta, None)
