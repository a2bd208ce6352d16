"""Inject, merge, unmerge, unload and disable adapters: one walk over the model, all or nothing.

Injection is two-phase: ``prepare`` builds every adapter without touching the model (so any error leaves it as it
was), ``attach`` swaps them in and freezes the base.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Union

import torch
from torch import Tensor, nn

from .config import AdapterConfig, ConfigError, as_adapter_config
from .methods.base import LINEAR_TYPES, AdaptedLayer, InsertedAdapter, MergeError
from .methods.registry import method_spec
from .targeting import resolve_targets

log = logging.getLogger(__name__)

Adapter = Union[AdaptedLayer, InsertedAdapter]


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """Every adapter in ``model`` by the path of the layer it adapts (an inserted adapter: its sublayer's path)."""
    found: dict[str, Adapter] = {}
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            found[path] = module
        elif isinstance(module, InsertedAdapter):
            found[path.rsplit(".", 1)[0] if "." in path else ""] = module
    return found


def injected_config(model: nn.Module) -> AdapterConfig | None:
    """The config the model's adapters were built from, or None for a model without adapters."""
    found = adapters(model)
    return next(iter(found.values())).config if found else None


def prepare(model: nn.Module, config: AdapterConfig, seed: int | None = None) -> dict[str, Adapter]:
    """Build the adapters ``config`` asks for, keyed by target path, without changing ``model``.

    With ``seed``, adapters are initialized from that seed inside a forked RNG: the same seed gives the same adapter
    whatever ran before (another strategy, another rank), and the caller's random stream is not advanced.
    """
    config = as_adapter_config(config, model)  # also a dict of options or a peft.LoraConfig
    if adapters(model):
        raise ConfigError(
            f"{type(model).__name__} already has {injected_config(model).method!r} adapters; call unload(model) "
            "first (one adapter at a time)."
        )
    spec = method_spec(config.method)
    default = (lambda m: spec.default_targets(m, config)) if spec.default_targets else None
    targets = resolve_targets(model, config, spec.is_supported, LINEAR_TYPES, default)
    modules = dict(model.named_modules())

    def build(path: str) -> Adapter:
        built = spec.build(modules[path], config, path)
        return AdaptedLayer(modules[path], built) if spec.mergeable else built

    if seed is None:
        return {path: build(path) for path in targets}
    # every device's generator: adapters of a model spread over several GPUs draw from each of them
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return {path: build(path) for path in targets}


def attach(model: nn.Module, prepared: dict[str, Adapter]) -> list[str]:
    """Put prepared adapters into ``model`` and freeze everything else in it; returns the adapted paths."""
    for path, adapter in prepared.items():
        target = model.get_submodule(path)
        adapter.train(target.training)  # dropout follows the mode the model is in
        if isinstance(adapter, AdaptedLayer):
            _set_submodule(model, path, adapter)
        else:
            adapter.attach(target)
        log.debug("lightning_lora: %s -> %s", path, type(adapter).__name__)
    freeze_base(model)
    return list(prepared)


def inject(model: nn.Module, config: AdapterConfig, seed: int | None = None) -> list[str]:
    """Add ``config``'s adapters to ``model`` in place and freeze its base; returns the adapted module paths.

    On any error (nothing matched, a rank too large, an unsupported layer) the model is left unchanged. ``seed``
    makes the initialization independent of the global RNG (see ``prepare``).
    """
    return attach(model, prepare(model, config, seed))


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters train; everything else in ``model`` is frozen."""
    trainable = {id(p) for a in adapters(model).values() for p in a.adapter_parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for adapter in adapters(model).values():
        yield from adapter.adapter_parameters()


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors keyed by their path in ``model``'s own state dict."""
    return {f"{path}.{name}" if path else name: t.detach()
            for path, adapter in adapters(model).items() for name, t in adapter.adapter_tensors().items()}


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict without adapter tensors: the base as it was before injection."""
    adapter_keys = set(adapter_state_dict(model))
    return {k: v for k, v in model.state_dict().items() if k not in adapter_keys}


def weight_adapters(model: nn.Module, action: str = "merge") -> list[AdaptedLayer]:
    """The model's adapted layers; a ``MergeError`` if it holds inserted adapters, which cannot ``action``, or an
    adapted layer whose weight is tied to another module's (the merge would change both)."""
    found = adapters(model)
    if any(isinstance(a, InsertedAdapter) for a in found.values()):
        raise MergeError(
            f"{injected_config(model).method!r} adapters are inserted modules and cannot be {action}d into the base "
            "weights; export the adapter with save_adapter(...) (or LoRACallback(export_merged=False)) instead."
        )
    layers = {path: a for path, a in found.items() if isinstance(a, AdaptedLayer)}
    _refuse_tied_weights(model, layers, action)
    return list(layers.values())


def merge(model: nn.Module, safe: bool = True) -> None:
    """Fold every adapter into its base weight. With ``safe``, nothing is merged if any result would be non-finite."""
    layers = weight_adapters(model, "merge")
    if safe:
        for layer in layers:
            layer.check_mergeable()
    for layer in layers:
        layer.merge()


merge_all = merge  # ``unload``'s ``merge`` argument shadows the function's name


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``: subtract each update from its base weight."""
    for layer in weight_adapters(model, "unmerge"):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every adapter and give back the original module objects; with ``merge``, fold the updates in first.

    Parameters stay frozen; call ``model.requires_grad_(True)`` to train the base again.
    """
    found = adapters(model)
    if merge:
        merge_all(model)
    else:
        for adapter in found.values():
            if isinstance(adapter, AdaptedLayer):
                adapter.unmerge()
    for path, adapter in found.items():
        if isinstance(adapter, AdaptedLayer):
            _set_submodule(model, path, adapter.unwrap())
        else:
            adapter.detach(model.get_submodule(path))
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are unmerged for it and merged back after)."""
    found = list(adapters(model).values())
    remerge = [(a, [n for n, u in a.adapters.items() if u.merged]) for a in found if isinstance(a, AdaptedLayer)]
    for adapter, names in remerge:
        adapter.unmerge(names)
    previous = [a.enabled for a in found]
    for adapter in found:
        adapter.enabled = False
    try:
        yield model
    finally:
        for adapter, enabled in zip(found, previous):
            adapter.enabled = enabled
        for adapter, names in remerge:
            adapter.merge(names)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared parameters counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _refuse_tied_weights(model: nn.Module, layers: dict[str, AdaptedLayer], action: str) -> None:
    """A weight shared between modules (tied embeddings) would be changed for all of them by a merge. Training and
    saving the adapter work (as in PEFT); merging it does not."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for path, layer in layers.items():
        own = f"{path}.weight" if path else "weight"
        others = [n for n in names.get(id(layer.weight), []) if n != own]
        if others:
            raise MergeError(
                f"{path}'s weight is tied to {', '.join(others)}: merging its adapter would change both, so it cannot "
                f"be {action}d. Save the adapter with save_adapter(...) instead (it works with tied weights), untie the "
                f"weights before injecting (e.g. give {others[0].rsplit('.', 1)[0]} its own copy of the weight), or "
                f"leave {path} out with exclude_modules."
            )


def enable_input_grads_for_checkpointing(model: nn.Module) -> bool:
    """With a frozen base, reentrant gradient checkpointing sees no input that requires grad and backward fails
    ("element 0 of tensors does not require grad"); make the input embeddings' output require grad, as PEFT does.
    Returns whether it was needed. Idempotent."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if not getattr(model, flag, False) or not hasattr(model, "enable_input_require_grads"):
        return False
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
        return False
    model.enable_input_require_grads()
    return True
