"""Adapter files: safetensors + JSON in PEFT's layout, saved and loaded all or nothing.

Nothing here unpickles: tensors come from safetensors, settings from JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import PathLike, atomic_directory, write_json
from .config import AdapterConfig, ConfigError, LoRAConfig
from .fingerprint import base_fingerprint
from .surgery import adapter_state_dict, adapters, attach, injected_config, prepare

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
FINGERPRINT_KEY = "lightning_lora.base_fingerprint"


class AdapterFileError(ValueError):
    """An adapter file that cannot be used with this model; the model is unchanged."""


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


