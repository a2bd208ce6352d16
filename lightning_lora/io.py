"""Adapter files: safetensors + JSON in PEFT's layout, saved and loaded all or nothing.

Nothing here unpickles: tensors come from safetensors, settings from JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import PathLike, check_export_target, export_directory, write_json
from .config import AdapterConfig, BottleneckConfig, ConfigError, LoRAConfig
from .fingerprint import base_fingerprint, compare_fingerprints
from .methods.base import DEFAULT_ADAPTER, AdaptedLayer, WeightUpdate, adapter_prefix
from .surgery import Adapter, adapter_names, adapters, attach, check_names, injected_config, prepare

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_KIND = "adapter"
PEFT_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # PEFT's key for state a tuner shares across layers (VeRA's projections)
FINGERPRINT_KEY = "lightning_lora.base_fingerprint"


class AdapterFileError(ValueError):
    """An adapter file that cannot be used with this model; the model is unchanged."""


# -- PEFT naming ---------------------------------------------------------------------------------------------------
def file_tensors(found: dict[str, Adapter], name: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """Adapter tensors by their names in an adapter file, which are PEFT's without its ``base_model.model.`` prefix:
    the model's ``<path>.adapters.<name>.lora_A.weight`` is the file's ``<path>.lora_A.weight`` (a pure rename of
    each update's ``file_tensors``, which are its own tensors unless its method converts them for the file)."""
    prefix = adapter_prefix(name)
    return {(f"{path}." if path else "") + key.removeprefix(prefix): tensor
            for path, adapter in found.items() for key, tensor in adapter.file_tensors().items()
            if key.startswith(prefix) or (not isinstance(adapter, AdaptedLayer)
                                          and getattr(adapter, "adapter_name", name) == name)}


def shared_file_tensors(found: dict[str, Any], name: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
    """The tensors all layers of adapter ``name`` share (``WeightUpdate.shared_tensors``), once, by their key in the
    file: ``base_model.<tensor>``, beside PEFT's ``base_model.model.`` tree as PEFT writes them."""
    shared: dict[str, Tensor] = {}
    for adapter in found.values():
        update = adapter.adapters[name] if isinstance(adapter, AdaptedLayer) and name in adapter.adapters else adapter
        if isinstance(update, WeightUpdate):
            shared.update({SHARED_PREFIX + k: t for k, t in update.shared_tensors().items()})
    return shared


def find_hf_model(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The one outermost transformers ``PreTrainedModel`` inside ``module`` (path and module), or None if there is
    none. Several are an error that asks for the path."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return None
    found: list[tuple[str, nn.Module]] = []
    for path, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(path.startswith(f"{p}.") or p == "" for p, _ in found):
            found.append((path, sub))
    if len(found) > 1:
        raise ConfigError(
            f"{type(module).__name__} holds several Hugging Face models ({', '.join(p or '<root>' for p, _ in found)}); "
            "name the one to adapt with model_attr."
        )
    return found[0] if found else None


def _task_type(model: nn.Module) -> Optional[str]:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if name.endswith(suffix):
            return task
    return None


class _OneAdapter:
    """One named adapter of an adapted layer as a config's ``file_dict`` reads layers: its update is the layer's only
    one (under ``DEFAULT_ADAPTER``), and the layer's ``kind`` is at hand."""

    def __init__(self, layer: AdaptedLayer, name: str) -> None:
        self.adapters = {DEFAULT_ADAPTER: layer.adapters[name]}
        self.kind = layer.kind


def _layers_of(model: nn.Module, name: str) -> dict[str, Any]:
    """Adapter ``name``'s layers by path (an inserted adapter is the model's only one)."""
    return {path: (_OneAdapter(a, name) if isinstance(a, AdaptedLayer) else a)
            for path, a in adapters(model).items()
            if (name in a.adapters if isinstance(a, AdaptedLayer) else a.adapter_name == name)}


def adapter_config_dict(model: nn.Module, name: Optional[str] = None) -> dict[str, Any]:
    """The ``adapter_config.json`` for ``model``'s adapter ``name`` (default: its first): PEFT's for the methods PEFT
    has, ours for other methods."""
    config = injected_config(model, name)
    if config is None:
        raise AdapterFileError(f"{type(model).__name__} has no adapters to save; inject some first.")
    name = name or adapter_names(model)[0]
    hf_config = getattr(model, "config", None)
    model_info = {"base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
                  "task_type": _task_type(model)}
    return config.file_dict(_layers_of(model, name), [p for p, _ in model.named_modules()], model_info)


def save_adapter(model: nn.Module, directory: PathLike, fingerprint: Optional[str] = None,
                 names: Union[str, Iterable[str], None] = None) -> Path:
    """Write ``model``'s adapters to ``directory`` as ``adapter_model.safetensors`` + ``adapter_config.json``.

    ``model`` is the module the adapters were injected into (for a Hugging Face model, the model itself): keys are
    ``base_model.model.<path>...`` as PEFT writes them, so ``peft.PeftModel.from_pretrained`` loads the result.
    Several named adapters are written in PEFT's layout: the ``"default"`` one at the top of ``directory``, each
    other one in the sub-folder of its name (``names`` picks some; default all); ``load_adapter`` reads them all back.
    ``directory`` must be new, empty, or a previous adapter export (which is replaced atomically); a file or a
    directory holding other files is refused with ``ExportTargetError`` before anything is written, so a user's files
    are never deleted. A failed write (a full disk) raises ``ExportError`` (an ``OSError``) and leaves the previous
    export in place. ``fingerprint``: the base's ``base_fingerprint`` taken earlier, for a base that cannot be sampled
    now without gathering it (sharded by FSDP2: ``LoRACallback`` takes it before sharding); None computes it.
    """
    check_export_target(directory, ADAPTER_KIND)
    if injected_config(model) is None:
        raise AdapterFileError(f"{type(model).__name__} has no adapters to save; inject some first.")
    names = adapter_names(model) if names is None else check_names(model, names)
    fingerprint = fingerprint or base_fingerprint(model)
    files = {name: _adapter_file(model, name, fingerprint) for name in names}
    with export_directory(directory, ADAPTER_KIND) as staging:
        for name, (tensors, metadata, config) in files.items():
            where = staging if name == DEFAULT_ADAPTER else staging / name
            where.mkdir(exist_ok=True)
            save_file(tensors, str(where / ADAPTER_WEIGHTS), metadata=metadata)
            write_json(where / ADAPTER_CONFIG, config)
    return Path(directory)


def _adapter_file(model: nn.Module, name: str, fingerprint: str) -> tuple[dict[str, Tensor], dict[str, str], dict]:
    """Adapter ``name``'s tensors (PEFT's keys), safetensors metadata and ``adapter_config.json``."""
    config = adapter_config_dict(model, name)
    found = adapters(model)
    # an adapter of the whole model (path "": prompt and prefix tuning) has its tensors at the top of PEFT's file
    top = set(file_tensors({"": found[""]}, name)) if "" in found else set()
    # a copy per key, as PEFT does: tensors the user tied would otherwise make safetensors refuse the file
    tensors = {(k if k in top else PEFT_PREFIX + k): v.to('cpu', copy=True).contiguous()
               for k, v in file_tensors(found, name).items()}
    tensors.update({k: v.to('cpu', copy=True).contiguous() for k, v in shared_file_tensors(found, name).items()})
    metadata = {"format": "pt", FINGERPRINT_KEY: fingerprint, "lightning_lora.method": injected_config(model, name).method}
    return tensors, metadata, config


def _read_config(config_path: Path) -> AdapterConfig:
    """``adapter_config.json`` as a config; every way it can be broken is an error that names the file."""
    try:
        text = config_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterFileError(f"{config_path} is not UTF-8 text ({err}); re-export the adapter.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{config_path} is not valid JSON ({err}); re-export the adapter.") from None
    if not isinstance(data, dict):
        raise AdapterFileError(
            f"{config_path} holds a JSON {type(data).__name__ if data is not None else 'null'} ({text.strip()[:40]!r}), "
            "not an object of adapter options such as {\"peft_type\": \"LORA\", \"r\": 8, ...}; re-export the adapter."
        )
    try:
        return AdapterConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{config_path}: {err}") from None


def _check_tensor_values(weights_path: Path, tensors: dict[str, Tensor]) -> None:
    """Integer tensors cannot be adapter weights, and NaN/Inf ones would make every output NaN: refuse both."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterFileError(
                f"{weights_path}: tensor {key} has dtype {tensor.dtype}, but adapter weights are floating point; "
                "the file was not written by an adapter export. Re-export the adapter."
            )
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(
                f"{weights_path}: tensor {key} holds NaN or Inf values (the training run diverged); loading it would "
                "make every output NaN. Use the adapter of an earlier checkpoint, or lower the learning rate and retrain."
            )


def read_adapter(directory: PathLike) -> tuple[AdapterConfig, dict[str, Tensor], dict[str, str]]:
    """Config, tensors (named as in ``file_tensors``) and metadata of an adapter directory; clear errors for broken
    files."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"Expected the path of an adapter directory, got {type(directory).__name__}.")
    directory = Path(directory)
    if directory.is_file():
        raise AdapterFileError(
            f"{directory} is a file; pass the directory that holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
            f"{f' (here {directory.parent})' if directory.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) else ''}."
        )
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterFileError(f"{path} does not exist; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.")
    config = _read_config(config_path)
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(
            f"{weights_path} is not a readable safetensors file ({err}); it may be truncated or in another format "
            "(pickled .bin files are not loaded). Re-export the adapter."
        ) from None
    ours: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".base_layer." in f".{name}":
            continue  # PEFT also saves the base embedding when it adapts one; the base is ours already
        ours[name] = tensor
    _check_tensor_values(weights_path, ours)
    return config, ours, metadata


# The dimension of each LoRA tensor that holds the rank: A is (r, in...), B is (out, r...).
RANK_DIMS = {"lora_A.weight": 0, "lora_B.weight": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


def _rank_mismatch(directory: Path, config: AdapterConfig, tensors: dict[str, Tensor],
                   expected: dict[str, Tensor]) -> str | None:
    """When the only shape differences are in the rank dimension, the config's ``r`` (or ``rank_pattern``) is wrong,
    not the base: a message that says which rank the tensors hold and what to write."""
    if not isinstance(config, LoRAConfig):
        return None
    file_ranks: dict[str, int] = {}
    for key, tensor in expected.items():
        got = tensors[key].shape
        if got == tensor.shape:
            continue
        dim = next((d for suffix, d in RANK_DIMS.items() if key.endswith("." + suffix)), None)
        same_elsewhere = dim is not None and len(got) == tensor.dim() and all(
            a == b for i, (a, b) in enumerate(zip(got, tensor.shape)) if i != dim)
        if not same_elsewhere:
            return None
        file_ranks[key.rsplit(".lora_", 1)[0]] = got[dim]
    config_path = directory / ADAPTER_CONFIG
    try:
        has_r = "r" in json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        has_r = True
    source = f"r={config.r}" if has_r else f"no 'r', so the default r={config.r} applies"
    ranks = sorted(set(file_ranks.values()))
    example = next(iter(file_ranks))
    fix = (f"set \"r\": {ranks[0]}" if len(ranks) == 1 else
           f"set \"r\" and \"rank_pattern\" to the ranks the tensors hold ({ranks})")
    return (
        f"{config_path} gives {source}{' (and a rank_pattern)' if config.rank_pattern else ''}, but "
        f"{directory / ADAPTER_WEIGHTS} holds rank {ranks[0] if len(ranks) == 1 else ranks} tensors for "
        f"{len(file_ranks)} modules (e.g. {example}: rank {file_ranks[example]}). The config does not match its "
        f"weights: {fix} in {ADAPTER_CONFIG}."
    )


def _drop_unused_patterns(config: AdapterConfig, tensors: dict[str, Tensor]) -> AdapterConfig:
    """PEFT keeps rank/alpha pattern keys that matched nothing in its files; they change nothing on load, so drop them
    rather than refuse the file (``inject`` refuses such keys because there they are typos)."""
    if not isinstance(config, LoRAConfig) or not (config.rank_pattern or config.alpha_pattern):
        return config
    from .targeting import pattern_matches

    trained = {key.rsplit(".lora_", 1)[0] for key in tensors if ".lora_" in f".{key}"}

    def used(patterns: dict) -> dict:
        return {k: v for k, v in patterns.items() if any(pattern_matches(k, p) for p in trained)}

    return dataclasses.replace(config, rank_pattern=used(config.rank_pattern), alpha_pattern=used(config.alpha_pattern))


def adapter_directories(directory: PathLike) -> dict[str, Path]:
    """The adapters saved in ``directory`` in PEFT's layout, by name: its own files as ``"default"``, and each
    sub-folder that holds an ``adapter_config.json`` under the folder's name."""
    directory = Path(directory)
    found = {DEFAULT_ADAPTER: directory} if (directory / ADAPTER_CONFIG).is_file() else {}
    if directory.is_dir():
        found.update({sub.name: sub for sub in sorted(directory.iterdir())
                      if sub.is_dir() and sub.name != DEFAULT_ADAPTER and (sub / ADAPTER_CONFIG).is_file()})
    return found


def load_adapter(model: nn.Module, directory: PathLike, check_base: bool = True, name: Optional[str] = None
                 ) -> list[str]:
    """Inject the adapters saved in ``directory`` (by us or by PEFT) into ``model`` and load their weights.

    Without ``name``, every adapter there is loaded: the directory's own files as ``"default"`` and each sub-folder
    of PEFT's multi-adapter layout under its folder's name (the first is active; ``set_active_adapters`` chooses).
    With ``name``, the directory's own files (or, if it has none, its sub-folder ``name``) are loaded as adapter
    ``name``. All or nothing: the files (UTF-8 JSON object, readable safetensors, finite floating-point tensors), keys,
    shapes and (for files we wrote) the base fingerprint of every adapter are checked before the model changes.
    ``check_base=False`` skips the fingerprint check. Returns the adapted module paths.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"Expected the path of an adapter directory, got {type(directory).__name__}.")
    directory = Path(directory)
    if name is not None:
        where = directory if (directory / ADAPTER_CONFIG).is_file() or not (directory / name).is_dir() else directory / name
        found = {name: where}
    else:
        found = adapter_directories(directory) or {DEFAULT_ADAPTER: directory}  # none: read_adapter says what is wrong
    fingerprint = None
    prepared = []
    for adapter_name, where in found.items():
        if adapter_name in adapter_names(model):
            raise ConfigError(
                f"{type(model).__name__} already has {injected_config(model, adapter_name).method!r} adapters named "
                f"{adapter_name!r}; call unload(model) (or delete_adapter(model, {adapter_name!r})) first, or load "
                f"{where} under another name: load_adapter(model, path, name='...')."
            )
        if fingerprint is None and check_base:
            fingerprint = base_fingerprint(model)
        prepared.append((adapter_name, _prepare_from_file(model, where, adapter_name, fingerprint)))
    paths: dict[str, None] = {}
    for adapter_name, updates in prepared:
        paths.update(dict.fromkeys(attach(model, updates, adapter_name)))
    return list(paths)


def _prepare_from_file(model: nn.Module, directory: Path, name: str, fingerprint: Optional[str]) -> dict[str, nn.Module]:
    """The adapter in ``directory`` built for ``model`` under ``name`` and holding the file's weights, checked
    against the model (``fingerprint``: the model's base fingerprint, None to skip that check); not attached."""
    config, tensors, metadata = read_adapter(directory)
    # seeded in a forked RNG: the file overwrites the initial values, and the caller's random stream must not move
    prepared = prepare(model, _drop_unused_patterns(config, tensors), seed=0, name=name)
    expected = {**file_tensors(prepared, name), **shared_file_tensors(prepared)}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{directory} does not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Was it saved from another model?"
        )
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(t.shape)}"
             for k, t in expected.items() if tensors[k].shape != t.shape]
    if wrong:
        raise AdapterFileError(_rank_mismatch(directory, config, tensors, expected) or
                               f"{directory} was saved for a base of another shape: {'; '.join(wrong[:5])}."
                               + (" If it was saved for this base, its reduction_factor in adapter_config.json does "
                                  "not match its tensors." if isinstance(config, BottleneckConfig) else ""))
    saved_fingerprint = metadata.get(FINGERPRINT_KEY)
    mismatch = compare_fingerprints(saved_fingerprint, fingerprint) if fingerprint and saved_fingerprint else None
    if mismatch:
        raise AdapterFileError(
            f"{directory} was trained on a different base model: {mismatch}. Its outputs would be wrong; load the base "
            "it was trained on, or pass check_base=False if you changed the base on purpose."
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(tensors[key])
    return prepared
