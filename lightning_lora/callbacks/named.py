"""Several named adapters in one run (``adapters=``), and routing each example of a batch to its own (``adapter_key``).

No Lightning here: the callback calls these from its hooks.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.mixed import BASE, set_batch_adapters
from lightning_lora.surgery import attach, prepare, set_active_adapters


def named_configs(named: Any, options: dict[str, Any]) -> dict[str, AdapterConfig]:
    """``adapters=`` as configs by name, each checked now (a bad option names its adapter)."""
    if named is None:
        return {}
    if not isinstance(named, dict) or not named:
        raise ConfigError(f"adapters must be a dict of adapter name to options, e.g. {{'task_a': {{'method': 'lora', "
                          f"'r': 8}}, 'task_b': {{'method': 'dora', 'r': 4}}}}, got {named!r}.")
    if options:
        raise ConfigError(f"With adapters=, give method options per adapter inside it; {', '.join(sorted(options))} "
                          "was given beside it (move it into each adapter's options).")
    configs = {}
    for name, opts in named.items():
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise ConfigError(f"adapters: {name!r} is no usable adapter name; use a string without '.' or '/'.")
        if not isinstance(opts, dict):
            raise ConfigError(f"adapters[{name!r}] must be a dict of options such as {{'method': 'lora', 'r': 8}}, "
                              f"got {opts!r}.")
        opts = dict(opts)
        try:
            configs[name] = AdapterConfig.create(opts.pop("method", "lora"), **opts)
        except ConfigError as err:
            raise ConfigError(f"adapters[{name!r}]: {err}") from None
    return configs


def inject_named(root: nn.Module, configs: dict[str, AdapterConfig], seed: int) -> list[str]:
    """Every named adapter, all built before any is attached (all or nothing), all active."""
    prepared = [(name, prepare(root, config, seed + i, name)) for i, (name, config) in enumerate(configs.items())]
    targets: dict[str, None] = {}
    for name, updates in prepared:
        targets.update(dict.fromkeys(attach(root, updates, name)))
    set_active_adapters(root, list(configs))
    return list(targets)


def route_batch(root: Optional[nn.Module], adapter_key: Optional[str], batch: Any) -> None:
    """With ``adapter_key``: each example of ``batch`` runs its own adapter (``mixed.set_batch_adapters``)."""
    if adapter_key is None or root is None:
        return
    if not isinstance(batch, dict) or adapter_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ConfigError(
            f"adapter_key={adapter_key!r}, but the batch has no such key (it holds {keys}); return dict "
            f"batches with one adapter name per example under {adapter_key!r} (\"__base__\" for none), or "
            "unset adapter_key."
        )
    names = batch[adapter_key]
    set_batch_adapters(root, [None if n in ("", BASE) else n for n in names])
