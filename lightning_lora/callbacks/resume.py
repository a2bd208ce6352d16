"""Resuming from the callback's checkpoints: what a checkpoint must match, and the RNG state it carries.

Lightning does not checkpoint RNG state, so the callback saves it (``rng_state``) and restores it (``set_rng_state``)
to draw the dropout masks an uninterrupted run would. No Lightning here.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from lightning_lora.callbacks.options import option_differences
from lightning_lora.config import ConfigError
from lightning_lora.fingerprint import compare_fingerprints


def check_identity(saved: Optional[dict[str, Any]], config: dict[str, Any], fingerprint: Optional[str],
                   named: Optional[dict[str, dict[str, Any]]] = None) -> None:
    """Refuse a checkpoint whose recorded adapter options or base fingerprint (``saved``) differ from this run's.
    With named adapters (``named``: name -> options), each adapter's options are compared, under its name (a
    checkpoint written before the names were recorded holds the first adapter's only: ``config``)."""
    if saved is None:
        return
    differences = option_differences(saved["config"], config, "the checkpoint")
    if named and "adapters" in saved:
        differences = named_differences(saved["adapters"], named)
    if differences:
        raise ConfigError(
            f"The checkpoint's adapter was trained with other options than this LoRACallback's "
            f"({'; '.join(differences)}); resume with the checkpoint's options."
        )
    mismatch = compare_fingerprints(saved["base_fingerprint"], fingerprint)
    if mismatch is not None:
        raise ConfigError(
            f"The checkpoint's adapter was trained on a different base model: {mismatch}. Load the base it "
            "was trained on."
        )


def named_differences(saved: dict[str, dict[str, Any]], named: dict[str, dict[str, Any]]) -> list[str]:
    """``adapters['name'].option: value in the checkpoint vs value in the callback`` for each named adapter's changed
    option, or the adapter names themselves when they differ."""
    if list(saved) != list(named):
        return [f"adapters: {list(saved)} in the checkpoint vs {list(named)} in the callback"]
    return [f"adapters[{name!r}].{difference}" for name, options in named.items()
            for difference in option_differences(saved[name], options, "the checkpoint")]


def check_state(model_state: dict[str, Any], saved_state: dict[str, Any], frozen: set[str], strict: bool) -> None:
    """Refuse a state dict of other shapes, or (when ``strict``) with keys missing or unexpected beyond the frozen
    base tensors (``frozen``), which a checkpoint never holds."""
    missing = sorted(set(model_state) - set(saved_state) - frozen)
    unexpected = sorted(set(saved_state) - set(model_state))
    reshaped = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(model_state[k].shape)}"
                for k, v in saved_state.items() if k in model_state and v.shape != model_state[k].shape]
    if reshaped or (strict and (missing or unexpected)):
        raise ConfigError(
            f"Checkpoint does not match the adapted model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, other shapes {reshaped[:3]}. "
            "Was it written with other adapter options or another model?"
        )


def rng_state() -> dict[str, Any]:
    """torch's, Python's and (once initialized) CUDA's RNG states, for a checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (CUDA's only on as many devices as it was saved from)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
