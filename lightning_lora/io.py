"""Adapter files (safetensors + JSON, PEFT's layout), merged exports, base fingerprints and atomic writes.

Nothing here unpickles: tensors come from safetensors, settings from JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import AdapterConfig, ConfigError, LoRAConfig
from .methods.base import MergeError, WeightAdapter, weight_sample
from .surgery import adapter_state_dict, adapters, attach, injected_config, prepare, weight_adapters

PathLike = Union[str, os.PathLike]
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_WEIGHTS = "model.safetensors"
PEFT_PREFIX = "base_model.model."
FINGERPRINT_KEY = "lightning_lora.base_fingerprint"


class AdapterFileError(ValueError):
    """An adapter file that cannot be used with this model; the model is unchanged."""


# -- atomic writes -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        for path in (staging, *staging.rglob("*")):  # mkdtemp makes it owner-only; exports are for sharing
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- which base an adapter belongs to ------------------------------------------------------------------------------
def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict without adapter tensors: the base as it was before injection."""
    adapter_keys = set(adapter_state_dict(model))
    return {k: v for k, v in model.state_dict().items() if k not in adapter_keys}


@torch.no_grad()
def base_fingerprint(model: nn.Module, samples: int = 16) -> str:
    """A short hash of the base weights' names, shapes and a few values each.

    Values are rounded to bfloat16 so that a dtype cast does not change the fingerprint, and sampled so that a 1B
    model is fingerprinted in milliseconds. Adapted layers report their base weight without the update, exactly as it
    was before merging (``WeightAdapter.base_weight_sample``), so merging does not change the fingerprint.
    """
    digest = hashlib.sha256()
    layers = {f"{p}.weight" if p else "weight": a for p, a in adapters(model).items() if isinstance(a, WeightAdapter)}
    for key, tensor in sorted(base_state_dict(model).items()):
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        if tensor.is_meta or tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.dtype == torch.int64):
            continue
        sample = layers[key].base_weight_sample(samples) if key in layers else weight_sample(tensor, samples)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# -- PEFT naming ---------------------------------------------------------------------------------------------------
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
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if name.endswith(suffix):
            return task
    return None


def adapter_config_dict(model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` for ``model``'s adapters: PEFT's for LoRA/DoRA, ours for other methods."""
    config = injected_config(model)
    if config is None:
        raise AdapterFileError(f"{type(model).__name__} has no adapters to save; inject some first.")
    found = adapters(model)
    if isinstance(config, LoRAConfig):
        hf_config = getattr(model, "config", None)
        return config.to_peft_dict(
            targets=list(found),
            ranks={p: a.r for p, a in found.items()},
            alphas={p: a.alpha for p, a in found.items()},
            fan_in_fan_out=any(getattr(a, "fan_in_fan_out", False) for a in found.values()),
            base_model_name_or_path=getattr(hf_config, "_name_or_path", None) or None,
            task_type=_task_type(model),
        )
    data = config.to_dict()
    data.update(target_modules=sorted(found), exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    return data


def save_adapter(model: nn.Module, directory: PathLike) -> Path:
    """Write ``model``'s adapters to ``directory`` as ``adapter_model.safetensors`` + ``adapter_config.json``.

    ``model`` is the module the adapters were injected into (for a Hugging Face model, the model itself): keys are
    ``base_model.model.<path>...`` as PEFT writes them, so ``peft.PeftModel.from_pretrained`` loads the result.
    The directory is replaced atomically.
    """
    config = adapter_config_dict(model)
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    metadata = {"format": "pt", FINGERPRINT_KEY: base_fingerprint(model), "lightning_lora.method": injected_config(model).method}
    with atomic_directory(directory) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata=metadata)
        write_json(staging / ADAPTER_CONFIG, config)
    return Path(directory)


def read_adapter(directory: PathLike) -> tuple[AdapterConfig, dict[str, Tensor], dict[str, str]]:
    """Config, tensors (our key names) and metadata of an adapter directory; clear errors for broken files."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterFileError(f"{path} does not exist; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.")
    try:
        config = AdapterConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{config_path} is not valid JSON ({err}); re-export the adapter.") from None
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
    return config, ours, metadata


def load_adapter(model: nn.Module, directory: PathLike, check_base: bool = True) -> list[str]:
    """Inject the adapter saved in ``directory`` (by us or by PEFT) into ``model`` and load its weights.

    All or nothing: keys, shapes and (for files we wrote) the base fingerprint are checked before the model changes.
    ``check_base=False`` skips the fingerprint check. Returns the adapted module paths.
    """
    config, tensors, metadata = read_adapter(directory)
    prepared = prepare(model, config)
    expected: dict[str, Tensor] = {}
    for path, adapter in prepared.items():
        expected.update({f"{path}.{name}" if path else name: t for name, t in adapter.adapter_tensors().items()})
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{directory} does not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Was it saved from another model?"
        )
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(t.shape)}"
             for k, t in expected.items() if tensors[k].shape != t.shape]
    if wrong:
        raise AdapterFileError(f"{directory} was saved for a base of another shape: {'; '.join(wrong[:5])}.")
    saved_fingerprint = metadata.get(FINGERPRINT_KEY)
    if check_base and saved_fingerprint and saved_fingerprint != base_fingerprint(model):
        raise AdapterFileError(
            f"{directory} was trained on a different base model (fingerprint {saved_fingerprint}, this model "
            f"{base_fingerprint(model)}): its outputs would be wrong. Load the base it was trained on, or pass "
            "check_base=False if you changed the base on purpose."
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(tensors[key])
    return attach(model, prepared)


# -- merged export -------------------------------------------------------------------------------------------------
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base state dict with every update folded in, computed out of place: the model is not changed.

    Raises ``MergeError`` for inserted adapters and for updates that would put inf/NaN into a weight."""
    layers = {id(layer) for layer in weight_adapters(model, "merge")}
    state = base_state_dict(model)
    for path, layer in adapters(model).items():
        if id(layer) not in layers:
            continue
        merged = layer.merged_weight()
        if not torch.isfinite(merged).all():
            raise MergeError(f"Merging {path} gives inf/NaN; the adapter has diverged, so no merged model was written.")
        state[f"{path}.weight" if path else "weight"] = merged
    return state


@contextlib.contextmanager
def _gguf_loaded_savable(model: nn.Module) -> Iterator[None]:
    """transformers refuses to save a model loaded from GGUF although its weights are already dequantized floats;
    lift that marker for the duration of the save only."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    is_gguf = quantizer is not None and "gguf" in type(quantizer).__name__.lower()
    is_gguf = is_gguf or (quantizer is None and qconfig is not None and "gguf" in str(qconfig).lower())
    if not is_gguf:
        yield
        return
    had_qconfig = hasattr(config, "quantization_config")
    model.hf_quantizer = None
    if had_qconfig:
        delattr(config, "quantization_config")
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_qconfig:
            config.quantization_config = qconfig


def export_merged(model: nn.Module, directory: PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` with its adapters merged, without changing ``model``.

    A Hugging Face model is written with ``save_pretrained`` (reload it with ``AutoModel...from_pretrained``), with
    ``tokenizer`` beside it when given, so the directory is a standalone model; any other module as
    ``model.safetensors`` holding its merged state dict. The directory is replaced atomically.
    """
    state = merged_state_dict(model)
    from transformers import PreTrainedModel

    with atomic_directory(directory) as staging:
        if isinstance(model, PreTrainedModel):
            with _gguf_loaded_savable(model):
                model.save_pretrained(staging, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        else:
            contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(_untie(contiguous), str(staging / MERGED_WEIGHTS), metadata={"format": "pt"})
    return Path(directory)


def _untie(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory; a plain state dict keeps each tied copy under its own key."""
    seen: dict[int, str] = {}
    out = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        out[key] = tensor.clone() if ptr in seen and tensor.numel() else tensor
        seen.setdefault(ptr, key)
    return out
