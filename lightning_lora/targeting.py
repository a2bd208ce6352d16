"""Target specs -> module paths, with PEFT's matching rules so that the same spec picks the same modules."""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable, Optional

from torch import nn

from .config import AdapterConfig, ConfigError, TargetSpec

ALL_LINEAR = "all-linear"


def _matches(spec: TargetSpec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def layer_index(path: str, layers_pattern: Optional[list[str] | str]) -> Optional[int]:
    """The transformer layer a module belongs to: the number after ``<layers_pattern>.`` or after the first
    ``.<name>.`` in the path, the first one so that nested indexes (experts) are not taken for layers."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        found = None
        for pattern in patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if found:
                break
    return int(found["idx"]) if found else None


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head, which ``all-linear`` leaves alone (as PEFT and QLoRA do)."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    names = {path for path, module in model.named_modules() if head is not None and module is head}
    return names or {path for path, _ in model.named_modules() if path.split(".")[-1] in ("lm_head", "classifier", "score")}


def resolve_targets(
    model: nn.Module,
    config: AdapterConfig,
    is_supported: Callable[[nn.Module], bool],
    linear_types: tuple[type, ...],
    default_targets: Callable[[nn.Module], list[str]] | None = None,
) -> list[str]:
    """Module paths in ``model`` that ``config`` targets, in model order.

    Raises ``ConfigError`` naming the closest module names when nothing matches, and naming the type when a matched
    module cannot carry this method.
    """
    spec = config.target_modules
    named = [(path, module) for path, module in model.named_modules() if path]
    if spec is None:
        if default_targets is None:
            raise ConfigError(
                f"Method {config.method!r} needs target_modules: a list of module names (e.g. ['q_proj', 'v_proj']), "
                "a regex matching whole module paths, or 'all-linear'."
            )
        candidates = default_targets(model)
        if not candidates:
            raise ConfigError(
                f"Could not locate sublayers for {config.method!r} in {type(model).__name__}: name the modules whose "
                "output the adapter follows with target_modules."
            )
        chosen = [(p, m) for p, m in named if p in set(candidates)]
    elif isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        heads = output_head_names(model)
        chosen = [(p, m) for p, m in named if isinstance(m, linear_types) and p not in heads]
    else:
        chosen = [(p, m) for p, m in named if _matches(spec, p)]

    chosen = [(p, m) for p, m in chosen if not _matches(config.exclude_modules, p)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        chosen = [(p, m) for p, m in chosen if layer_index(p, config.layers_pattern) in wanted]

    if not chosen:
        raise ConfigError(_nothing_matched_message(config, [p for p, _ in named]))
    unsupported = [(p, type(m).__name__) for p, m in chosen if not is_supported(m)]
    if unsupported and not (isinstance(spec, str) and spec.lower() == ALL_LINEAR):
        listed = ", ".join(f"{p} ({t})" for p, t in unsupported[:5])
        raise ConfigError(
            f"target_modules matched modules that {config.method!r} cannot adapt: {listed}"
            f"{' ...' if len(unsupported) > 5 else ''}. Narrow target_modules or add them to exclude_modules."
        )
    return [p for p, _ in chosen]


def _nothing_matched_message(config: AdapterConfig, paths: Iterable[str]) -> str:
    paths = list(paths)
    leaf_names = sorted({p.split(".")[-1] for p in paths})
    spec = config.target_modules
    wanted = [spec] if isinstance(spec, str) else list(spec or [])
    near: list[str] = []
    for word in wanted:
        near += difflib.get_close_matches(word.split(".")[-1], leaf_names, n=3, cutoff=0.4)
        near += difflib.get_close_matches(word, paths, n=2, cutoff=0.6)
    near = list(dict.fromkeys(near))
    extra = ""
    if config.exclude_modules or config.layers_to_transform is not None:
        extra = f" (after exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r})"
    hint = f" Closest module names: {', '.join(near)}." if near else ""
    return (
        f"target_modules={spec!r} matched no module{extra}.{hint} "
        f"Module names in this model include: {', '.join(leaf_names[:20])}{' ...' if len(leaf_names) > 20 else ''}."
    )


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rank/alpha pattern lookup: the first key that matches the end of ``path`` at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default
