"""Inject, merge, unmerge, unload and disable adapters: one walk over the model, all or nothing.

Injection is two-phase: ``prepare`` builds every adapter without touching the model (so any error leaves it as it
was), ``attach`` swaps them in and freezes the base.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator, Union

import torch
from torch import Tensor, nn

from .config import DEFAULT_ADAPTER, AdapterConfig, ConfigError, as_adapter_config
from .methods.base import LINEAR_TYPES, AdaptedLayer, MergeError, WeightUpdate
from .methods.inserted import InsertedAdapter
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


def injected_config(model: nn.Module, name: str | None = None) -> AdapterConfig | None:
    """The config adapter ``name`` (default: the model's first adapter) was built from; None if there is none."""
    found = adapters(model)
    if not found:
        return None
    if name is None:
        name = adapter_names(model)[0]
    for adapter in found.values():
        if isinstance(adapter, AdaptedLayer) and name in adapter.adapters:
            return adapter.adapters[name].config
        if isinstance(adapter, InsertedAdapter) and name == adapter.adapter_name:
            return adapter.config
    return None


def adapter_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s adapters, in the order they were added."""
    names: dict[str, None] = {}
    for adapter in adapters(model).values():
        names.update(dict.fromkeys(adapter.adapters if isinstance(adapter, AdaptedLayer) else [adapter.adapter_name]))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters ``model``'s forward applies (``set_active_adapters``), in the order it applies them."""
    layer = next((a for a in adapters(model).values() if isinstance(a, AdaptedLayer)), None)
    if layer is None or layer.active_adapters is None:
        return adapter_names(model)
    return list(layer.active_adapters)


def check_names(model: nn.Module, names: Iterable[str], what: str = "adapter") -> list[str]:
    """``names`` as a list, each a known adapter of ``model``; an unknown one is a ``ConfigError`` listing the known."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"{type(model).__name__} has no {what} named {', '.join(map(repr, unknown))}; its adapters are "
            f"{', '.join(map(repr, known)) or 'none'}. Load or inject it first (inject(model, config, name=...), "
            "load_adapter(model, directory, name=...)), or use one of those names."
        )
    return names


def set_active_adapters(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make ``names`` (one name or several, applied in that order) the adapters ``model``'s forward applies. When
    adapters are merged, the weights are switched to exactly the base plus the new set (no rounding accumulates)."""
    names = list(dict.fromkeys(check_names(model, names)))
    layers = [a for a in adapters(model).values() if isinstance(a, AdaptedLayer)]
    if any(layer.merged for layer in layers):
        _refuse_tied_weights(model, dict(adapters(model)), "merge")
        for layer in layers:
            layer.set_merged([n for n in names if n in layer.adapters])
    for layer in layers:
        layer.active_adapters = tuple(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``model`` (taken out of merged weights exactly first); a layer left without
    adapters is given back its original module."""
    check_names(model, name)
    found = adapters(model)
    inserted = {path: a for path, a in found.items() if isinstance(a, InsertedAdapter)}
    joined = [a for a in inserted.values() if a.joins_adapters]
    if any(a.adapter_name == name for a in joined):  # X-LoRA itself: its experts stay
        for path, adapter in inserted.items():
            if adapter.adapter_name == name:
                adapter.detach(model.get_submodule(path))
        freeze_base(model)
        return
    if joined:
        raise ConfigError(f"Adapter {name!r} is one of the experts {joined[0].adapter_name!r} "
                          f"({joined[0].config.method}) gates; delete_adapter(model, {joined[0].adapter_name!r}) first.")
    if inserted:
        unload(model)
        return
    for path, layer in found.items():
        if name not in layer.adapters:
            continue
        layer.unmerge([name])
        layer.adapters[name].on_detach(layer)
        del layer.adapters[name]
        if not layer.adapters:
            _set_submodule(model, path, layer.unwrap())
    for layer in adapters(model).values():
        layer.active_adapters = tuple(n for n in layer.active_adapters if n != name)


@contextlib.contextmanager
def _original_modules(model: nn.Module) -> Iterator[dict[str, AdaptedLayer]]:
    """Inside the block, each adapted layer is replaced by its original module, so that targeting sees the model as
    it was (an ``AdaptedLayer`` is no ``nn.Linear``, and its adapters' own layers must not be targeted)."""
    layers = {p: a for p, a in adapters(model).items() if isinstance(a, AdaptedLayer)}
    for path, layer in layers.items():
        _set_submodule(model, path, layer.unwrap())
    try:
        yield layers
    finally:
        for path, layer in layers.items():
            _set_submodule(model, path, layer)


def prepare(model: nn.Module, config: AdapterConfig, seed: int | None = None,
            name: str = DEFAULT_ADAPTER) -> dict[str, nn.Module]:
    """Build the adapter ``config`` asks for under ``name`` without changing ``model``: its ``WeightUpdate`` (or
    ``InsertedAdapter``) per target path, for ``attach``.

    With ``seed``, adapters are initialized from that seed inside a forked RNG: the same seed gives the same adapter
    whatever ran before (another strategy, another rank), and the caller's random stream is not advanced.
    """
    config = as_adapter_config(config, model)  # also a dict of options or a peft.LoraConfig
    spec = method_spec(config.method)
    _check_new_name(model, name)
    default = (lambda m: spec.default_targets(m, config)) if spec.default_targets else None
    with _original_modules(model):
        targets = (spec.find_targets(model, config) if spec.find_targets else
                   resolve_targets(model, config, spec.is_supported, LINEAR_TYPES, default))
        modules = {path: model.get_submodule(path) for path in targets}

    shared: dict[str, nn.Module] = {}  # what all layers of the adapter share (MethodSpec.shared), built once

    def build(path: str) -> nn.Module:
        if spec.shared is not None and not shared:
            shared["shared"] = spec.shared(list(modules.values()), config)
        return spec.build(modules[path], config, path, **shared)

    if seed is None:
        built = {path: build(path) for path in targets}
    else:
        # every device's generator: adapters of a model spread over several GPUs draw from each of them
        cuda = range(torch.cuda.device_count()) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            built = {path: build(path) for path in targets}
    for adapter in built.values():
        if isinstance(adapter, InsertedAdapter):
            adapter.adapter_name = name
    found = adapters(model)
    if found and any(isinstance(a, InsertedAdapter) and not a.joins_adapters
                     for a in [*found.values(), *built.values()]):
        raise ConfigError(
            f"{type(model).__name__} already has {injected_config(model).method!r} adapters, and inserted-module "
            f"methods ({config.method!r} or the model's) take one adapter per model; call unload(model) first. "
            "Several named adapters work for every weight-update method (lora, dora, loha, ...)."
        )
    return built


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name or name == "__base__":
        raise ConfigError(
            f"Adapter name {name!r} is not usable: give a non-empty string without '.' or '/' (it is a state dict key "
            "part and a folder name), e.g. 'task_a'."
        )
    found = adapters(model)
    if not found:
        return
    if name in adapter_names(model):
        raise ConfigError(
            f"{type(model).__name__} already has {injected_config(model, name).method!r} adapters; call unload(model) "
            f"first (or delete_adapter(model, {name!r}): that name is taken), or add this one under another name, "
            "e.g. inject(model, config, name='task_b')."
        )
    if any(a.merged for a in found.values()):
        raise ConfigError(
            f"{type(model).__name__} has merged adapters; unmerge(model) before adding adapter {name!r} (a new "
            "adapter is built from the base weights)."
        )


def attach(model: nn.Module, prepared: dict[str, nn.Module], name: str = DEFAULT_ADAPTER) -> list[str]:
    """Put adapter ``name`` (prepared by ``prepare``) into ``model`` and freeze everything else in it; returns the
    adapted paths. The first adapter of a model is active; later ones are added inactive (as PEFT's
    ``add_adapter``): choose with ``set_active_adapters``."""
    # None: all of the layer's adapters; once a second one comes, the active set is explicit and does not grow
    active = tuple(active_adapters(model)) if adapters(model) else None
    for path, adapter in prepared.items():
        target = model.get_submodule(path)
        adapter.train(target.training)  # dropout follows the mode the model is in
        if isinstance(adapter, InsertedAdapter):
            adapter.attach(target)
        elif isinstance(target, AdaptedLayer):
            target.adapters[name] = adapter
            target.active_adapters = active
        else:
            layer = AdaptedLayer(target, adapter, name)
            layer.active_adapters = active
            layer.train(target.training)
            _set_submodule(model, path, layer)
        if isinstance(adapter, WeightUpdate):
            adapter.on_attach(model.get_submodule(path))  # PiSSA/OLoRA move part of the base into the adapter here
        log.debug("lightning_lora: %s -> %s (%s)", path, type(adapter).__name__, name)
    for layer in adapters(model).values():
        if isinstance(layer, AdaptedLayer):
            layer.active_adapters = active
    freeze_base(model)
    return list(prepared)


def inject(model: nn.Module, config: AdapterConfig, seed: int | None = None, name: str = DEFAULT_ADAPTER) -> list[str]:
    """Add ``config``'s adapter to ``model`` in place under ``name`` and freeze its base; returns the adapted paths.

    On any error (nothing matched, a rank too large, an unsupported layer, a name in use) the model is left
    unchanged. ``seed`` makes the initialization independent of the global RNG (see ``prepare``). Several named
    adapters may share a model, each with its own method, rank, targets and scaling; the first is active, later
    ones are chosen with ``set_active_adapters``.
    """
    return attach(model, prepare(model, config, seed, name), name)


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters train; everything else in ``model`` is frozen."""
    found = adapters(model).values()
    trainable = {id(p) for a in found for p in a.adapter_parameters()}
    trainable -= {id(p) for a in found if isinstance(a, InsertedAdapter) for p in a.frozen_parameters()}
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
    state = {k: v for k, v in model.state_dict().items() if k not in adapter_keys}
    for path, adapter in adapters(model).items():  # a merged BitFit's base holds the trained biases: the originals
        if isinstance(adapter, InsertedAdapter):
            state.update({f"{path}.{k}" if path else k: v for k, v in adapter.base_tensors().items()})
    return state


def weight_adapters(model: nn.Module, action: str = "merge") -> list[AdaptedLayer]:
    """The model's adapted layers; a ``MergeError`` if it holds inserted adapters, which cannot ``action``, or an
    adapted layer whose weight is tied to another module's (the merge would change both)."""
    found = adapters(model)
    if any(isinstance(a, InsertedAdapter) and not a.mergeable for a in found.values()):
        raise MergeError(
            f"{injected_config(model).method!r} adapters are inserted modules and cannot be {action}d into the base "
            "weights; export the adapter with save_adapter(...) (or LoRACallback(export_merged=False)) instead."
        )
    layers = {path: a for path, a in found.items() if isinstance(a, AdaptedLayer)}
    _refuse_tied_weights(model, layers, action)
    return list(layers.values())


def merge(model: nn.Module, safe: bool = True, names: str | Iterable[str] | None = None) -> None:
    """Fold adapters ``names`` (default: the active ones) into their base weights. With ``safe``, nothing is merged
    if any result would be non-finite. The exact base is kept (see ``AdaptedLayer.set_merged``): unmerging, switching
    and ``disable_adapters`` give it back bit for bit."""
    layers = weight_adapters(model, "merge")
    inserted = [a for a in adapters(model).values() if isinstance(a, InsertedAdapter)]  # mergeable ones (BitFit)
    if inserted:
        for adapter in inserted if safe else []:
            adapter.check_mergeable()
        for adapter in inserted:
            adapter.merge()
    wanted = check_names(model, active_adapters(model) if names is None else names)
    plan = [(layer, [n for n in wanted if n in layer.adapters]) for layer in layers]
    if safe:
        for layer, chosen in plan:
            merged = [n for n, u in layer.adapters.items() if u.merged or n in chosen]
            if chosen and not all(layer.adapters[n].merged for n in chosen):
                with torch.no_grad():
                    total = layer.base_weight().float() + sum(layer.delta_weight(n).float() for n in merged)
                if not torch.isfinite(total).all():
                    raise MergeError("merging would put inf/NaN into the weight; the adapter weights have diverged")
    for layer, chosen in plan:
        if chosen:
            layer.merge(chosen)


merge_all = merge  # ``unload``'s ``merge`` argument shadows the function's name


def unmerge(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Undo ``merge`` for adapters ``names`` (default: all): the base is written back bit for bit."""
    names = None if names is None else check_names(model, names)
    for layer in weight_adapters(model, "unmerge"):
        layer.unmerge(names)
    for adapter in adapters(model).values():
        if isinstance(adapter, InsertedAdapter):
            adapter.unmerge()  # mergeable inserted adapters (BitFit) put the original base tensors back


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every adapter and give back the original module objects; with ``merge``, fold the active adapters in
    first.

    Parameters stay frozen; call ``model.requires_grad_(True)`` to train the base again.
    """
    found = adapters(model)
    if merge:
        merge_all(model)
    else:
        for adapter in found.values():
            adapter.unmerge()  # a no-op for inserted adapters that cannot merge
    for path, adapter in found.items():
        if isinstance(adapter, AdaptedLayer):
            for update in adapter.adapters.values():
                update.on_detach(adapter)  # PiSSA/OLoRA give back the part of the base they took (if unmerged)
            adapter.exact_base = None
            _set_submodule(model, path, adapter.unwrap())
        else:
            adapter.detach(model.get_submodule(path))
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block. Merged weights stay merged: the layers run their kept exact base
    instead (no unmerge and merge again, so nothing rounds)."""
    found = list(adapters(model).values())
    previous = [a.enabled for a in found]
    for adapter in found:
        adapter.enabled = False
    try:
        yield model
    finally:
        for adapter, enabled in zip(found, previous):
            adapter.enabled = enabled


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
