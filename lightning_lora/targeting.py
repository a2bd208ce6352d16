"""Target specs -> module paths, with PEFT's matching rules so that the same spec picks the same modules."""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable, Optional

from torch import nn

from .config import ALL_LINEAR, AdapterConfig, ConfigError, TargetSpec


def _matches(spec: TargetSpec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def layer_index(path: str, layers_pattern: Optional[list[str] | str]) -> Optional[int]:
    """The layer a module belongs to, by PEFT's rule (``check_target_module_exists``): the number after the first
    ``<layers_pattern>.``, or without a pattern the first number that follows a dotted name. So
    ``model.layers.3.mlp.experts.7.w1`` is layer 3, but a top-level ``layers.0.mlp.experts.2.w1`` gives 2 (the first
    ``.`` comes after ``layers``) and ``layers.2.attn`` gives None; tests check this against PEFT itself."""
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

    all_linear = isinstance(spec, str) and spec.lower() == ALL_LINEAR
    chosen = [(p, m) for p, m in chosen if not _matches(config.exclude_modules, p)]
    before_layers = [p for p, _ in chosen]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        # PEFT: a path listed in full is taken as is; the layer filter applies to suffix and pattern matches
        listed = set(spec) if isinstance(spec, list) else set()
        chosen = [(p, m) for p, m in chosen if p in listed or layer_index(p, config.layers_pattern) in wanted]

    if not chosen:
        raise ConfigError(_nothing_matched_message(config, [p for p, _ in named], before_layers))
    never_called = [p for p, _ in chosen if _forward_never_called(model, p)]
    if never_called and (not all_linear or len(never_called) == len(chosen)):
        raise ConfigError(
            f"{', '.join(never_called[:5])}: the out_proj of an nn.MultiheadAttention, which passes the weight to "
            "F.multi_head_attention_forward itself and never calls out_proj's forward, so an adapter there would never "
            "train. Add it to exclude_modules and target other layers (all-linear skips it for this reason)."
        )
    chosen = [(p, m) for p, m in chosen if p not in never_called]
    unsupported = [(p, type(m).__name__) for p, m in chosen if not is_supported(m)]
    if unsupported and not all_linear:
        listed = ", ".join(f"{p} ({t})" for p, t in unsupported[:5])
        raise ConfigError(
            f"target_modules matched modules that {config.method!r} cannot adapt: {listed}"
            f"{' ...' if len(unsupported) > 5 else ''}. Narrow target_modules or add them to exclude_modules."
        )
    targets = [p for p, _ in chosen]
    _check_patterns_used(config, targets)
    return targets


def _forward_never_called(model: nn.Module, path: str) -> bool:
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` directly, so wrapping ``out_proj`` changes nothing."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return name == "out_proj" and isinstance(parent, nn.MultiheadAttention)


def _check_patterns_used(config: AdapterConfig, targets: list[str]) -> None:
    """A ``rank_pattern``/``alpha_pattern`` key that matches no targeted module is a typo: without this check the
    module it meant would silently train with the default r/alpha."""
    for option in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, option, None) or {}:
            if not any(pattern_matches(key, path) for path in targets):
                names = sorted({p.split(".")[-1] for p in targets})
                raise ConfigError(
                    f"{option} key {key!r} matches none of the {len(targets)} targeted modules, so it would change "
                    f"nothing. A key matches the end of a module path at a dot (a name like 'q_proj' or a regex like "
                    f"r'layers\\.0\\.q_proj'). Targeted module names: {', '.join(names[:20])}"
                    f"{' ...' if len(names) > 20 else ''}; for example {targets[0]}. Fix the key or drop it."
                )


def _nothing_matched_message(config: AdapterConfig, paths: Iterable[str], before_layers: list[str]) -> str:
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
    if isinstance(spec, str):
        hint += (" A string is a regular expression that must match the whole module path (e.g. r'.*\\.q_proj'); "
                 "to match by name, give a list such as ['q_proj'].")
    if before_layers and config.layers_to_transform is not None:
        return _layers_message(config, before_layers)
    return (
        f"target_modules={spec!r} matched no module{extra}.{hint} "
        f"Module names in this model include: {', '.join(leaf_names[:20])}{' ...' if len(leaf_names) > 20 else ''}."
    )


def _layers_message(config: AdapterConfig, before_layers: list[str]) -> str:
    """Targets matched, but the layer filter removed all of them: say whether no index was found (layers_pattern)
    or the indexes found are not the ones asked for."""
    found = sorted({i for i in (layer_index(p, config.layers_pattern) for p in before_layers) if i is not None})
    example = before_layers[0]
    parts = example.split(".")
    lists = [a for a, b in zip(parts, parts[1:]) if b.isdigit()]
    where = f" (layers_pattern={config.layers_pattern!r})" if config.layers_pattern else ""
    if not found:
        fix = (f"set layers_pattern to the name before the layer index, here {lists[0]!r}" if lists else
               "these modules have no numbered layer in their path; drop layers_to_transform")
        return (
            f"target_modules={config.target_modules!r} matched {len(before_layers)} modules (e.g. {example}), but "
            f"no layer index could be read from their paths{where}, so layers_to_transform="
            f"{config.layers_to_transform!r} kept none of them: {fix}."
        )
    return (
        f"target_modules={config.target_modules!r} matched {len(before_layers)} modules (e.g. {example}) in layers "
        f"{found}{where}, but layers_to_transform={config.layers_to_transform!r} selects none of those layers. "
        "Pick indexes from that list."
    )


def pattern_matches(key: str, path: str) -> bool:
    """PEFT's rank/alpha pattern rule: ``key`` (a name or regex) matches the end of ``path`` at a dot boundary."""
    return re.match(rf"(.*\.)?({key})$", path) is not None


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rank/alpha pattern lookup: the value of the first key that matches ``path``."""
    for key, value in patterns.items():
        if pattern_matches(key, path):
            return value
    return default
