"""The callback's option checks: merge options up front, and an adapter's options against the callback's.

No Lightning here: the callback decides when to check, this module what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from lightning_lora.config import ALL_LINEAR, AdapterConfig, ConfigError
from lightning_lora.surgery import adapters
from lightning_lora.targeting import _matches, layer_index  # PEFT's matching rules

_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def merge_options(target: Optional[str], original: Optional[str], quantize: Any, export: bool) -> dict[str, Any]:
    """``export_merged``'s merge options, checked before training starts."""
    from lightning_lora.quantize_merge import MERGE_TARGETS

    if target is None and original is None:
        return {}
    if target not in (None, *MERGE_TARGETS):
        raise ConfigError(f"LoRACallback(merge_target={target!r}): use one of {MERGE_TARGETS}.")
    if quantize is None or not export:
        raise ConfigError("LoRACallback(merge_target=..., original_weights=...) choose what the merged export of a "
                          "quantized base holds: set quantize= (and keep export_merged on), or drop them.")
    if (target == "original") != (original is not None):
        raise ConfigError("LoRACallback: merge_target='original' and original_weights=<path to the full-precision "
                          "weights (.safetensors file or save_pretrained directory)> go together.")
    if original is not None and not Path(original).exists():
        raise ConfigError(f"LoRACallback(original_weights={original!r}): no such file or directory.")
    return {"merge_target": target or "dequantized", **({"original": original} if original is not None else {})}


def differences(root: nn.Module, have: AdapterConfig, want: AdapterConfig) -> list[str]:
    """The options in which the model's adapter (``have``) differs from the callback's (``want``), as
    ``option: value in the model vs value in the callback``. Targeting options count only if ``want`` would pick
    other modules than the adapted ones: a loaded adapter records the exact paths it adapts, not the spec."""
    h, w = have.to_dict(), want.to_dict()
    if any(h.get(k) != w.get(k) for k in _TARGETING) and picks_exactly(root, want, sorted(adapters(root))):
        h.update({k: w.get(k) for k in _TARGETING})
    return option_differences(h, w, "the model")


def option_differences(have: dict[str, Any], want: dict[str, Any], where: str) -> list[str]:
    """``option: value in <where> vs value in the callback`` for each option whose values differ."""
    return [f"{k}: {have.get(k)!r} in {where} vs {want.get(k)!r} in the callback"
            for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]


def picks_exactly(root: nn.Module, config: AdapterConfig, adapted: list[str]) -> bool:
    """Whether ``config``'s target list or regex picks exactly the ``adapted`` module paths of ``root`` (PEFT's
    matching rules; ``all-linear`` is not resolved here and counts as a difference)."""
    spec = config.target_modules
    if spec is None or spec == ALL_LINEAR:
        return False
    layers = config.layers_to_transform
    layers = None if layers is None else ([layers] if isinstance(layers, int) else list(layers))

    def picked(path: str) -> bool:
        return (_matches(spec, path) and not _matches(config.exclude_modules, path)
                and (layers is None or layer_index(path, config.layers_pattern) in layers))

    inside = tuple(f"{path}." for path in adapted)  # the adapted layers' own submodules (base layer, adapter weights)
    others = [path for path, _ in root.named_modules() if path and path not in adapted and not path.startswith(inside)]
    names_used = not isinstance(spec, list) or all(any(_matches([n], p) for p in adapted) for n in spec)
    return all(picked(p) for p in adapted) and not any(picked(p) for p in others) and names_used
