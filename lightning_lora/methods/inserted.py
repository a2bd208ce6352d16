"""The inserted-module interface: ``InsertedAdapter``, an adapter added beside or before a sublayer through forward
hooks (bottleneck adapters, LLaMA-Adapter, prefix and prompt tuning, BitFit, X-LoRA), and the helpers those methods
share. The weight-update interface (``WeightUpdate``, ``AdaptedLayer``) and ``MethodSpec`` are in ``base.py``.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..config import DEFAULT_ADAPTER, AdapterConfig, ConfigError
from .base import MergeError


def keyword_arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's positional arguments named after ``module.forward``'s parameters, merged with its keyword arguments:
    what a forward pre-hook that rewrites a model's inputs (``input_ids``, ``attention_mask``, ...) reads and returns."""
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(module.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    return {**dict(zip(names, args)), **kwargs}


def whole_model(model: nn.Module, config: AdapterConfig) -> list[str]:
    """``MethodSpec.find_targets`` of methods that change the model's inputs (prompt and prefix tuning): their one
    adapter belongs to the model itself (path ""). Such a config takes no target options (``refuse_targets``)."""
    return [""]


def refuse_targets(config: AdapterConfig, why: str) -> None:
    """A ``ConfigError`` naming the first target option ``config`` sets, for methods that choose their own places."""
    for option in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
        if getattr(config, option) is not None:
            raise ConfigError(f"{config.method} takes no {option}: {why}. Leave it unset.")


class InsertedAdapter(nn.Module):
    """An inserted-module adapter: attached as a child of one sublayer, it rewrites the output of that sublayer (or of
    the module inside it that ``hooked_module`` names) through a forward hook. It never touches base weights.

    ``rewrites`` names the hooks ``attach`` registers on the hooked module, each first among that module's hooks:
    ``"output"`` (a forward hook: ``rewrite_call``, by default ``rewrite_output``) and ``"inputs"`` (a forward pre-hook:
    ``rewrite_inputs``, for methods that change a model's inputs, such as prompt and prefix tuning). ``file_tensors``
    names the tensors as the adapter file does, when PEFT's names differ from the module's state names.
    A ``mergeable`` one (BitFit) trains copies of base tensors: ``merge`` writes them into the base, ``unmerge`` puts the
    originals back exactly, and ``merged_tensors`` gives the merged values out of place.
    """

    attach_name = "adapter"
    rewrites: tuple[str, ...] = ("output",)
    mergeable = False
    joins_adapters = False  # X-LoRA: added beside the model's weight-update adapters (other inserted ones refuse them)

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_hooks", [])
        self.enabled = True
        self.adapter_name = DEFAULT_ADAPTER  # the name it was injected under (set by ``surgery.prepare``)

    def hooked_module(self, sublayer: nn.Module) -> nn.Module:
        """The module whose output the adapter rewrites: the sublayer itself unless a method places it elsewhere."""
        return sublayer

    def attach(self, sublayer: nn.Module) -> None:
        sublayer.add_module(self.attach_name, self)
        # first among the module's hooks, so that others (transformers records hidden states with hooks) see our output
        hooked = self.hooked_module(sublayer)
        hooks = []
        if "inputs" in self.rewrites:
            hooks.append(hooked.register_forward_pre_hook(self._inputs_if_enabled, prepend=True, with_kwargs=True))
        if "output" in self.rewrites:
            hooks.append(hooked.register_forward_hook(self._rewrite_if_enabled, prepend=True, with_kwargs=True))
        object.__setattr__(self, "_hooks", hooks)

    def detach(self, sublayer: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        object.__setattr__(self, "_hooks", [])
        delattr(sublayer, self.attach_name)

    def _inputs_if_enabled(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        return self.rewrite_inputs(module, args, kwargs) if self.enabled else None

    def _rewrite_if_enabled(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        return self.rewrite_call(module, args, kwargs, output) if self.enabled else output

    def rewrite_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple[tuple, dict]]:
        """The hooked module's new ``(args, kwargs)``, or None to leave them (registered when ``rewrites`` says so)."""
        return None

    def rewrite_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """The hooked module's new output, for adapters that need the call's keyword arguments; ``rewrite_output``
        otherwise."""
        return self.rewrite_output(module, args, output)

    def rewrite_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        """The hooked module's new output: this adapter applied to the output (the first element of a tuple)."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)

    def adapter_tensors(self) -> dict[str, Tensor]:
        return {f"{self.attach_name}.{n}": t for n, t in self.state_dict(keep_vars=True).items()}

    def file_tensors(self) -> dict[str, Tensor]:
        """The tensors an adapter file holds, named relative to the sublayer (for an adapter of the whole model, path
        "", as PEFT names them at the top of its file, e.g. ``prompt_embeddings``); loading copies into them."""
        return self.adapter_tensors()

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Other adapters' parameters this one keeps frozen (X-LoRA's experts); ``freeze_base`` honors it."""
        return []

    # -- only for ``mergeable`` adapters -------------------------------------------------------------------------------
    def base_tensors(self) -> dict[str, Tensor]:
        """While merged: the base tensors as they were before the merge, named relative to the sublayer (so
        ``base_state_dict`` and the base fingerprint do not change with a merge); empty otherwise."""
        return {}

    def merged_tensors(self) -> dict[str, Tensor]:
        """The base tensors this adapter replaces when merged, with their merged values, named relative to the
        sublayer (``{"bias": ...}``); computed out of place."""
        raise MergeError(f"{type(self).__name__} cannot be merged")

    def check_mergeable(self) -> None:
        if not all(torch.isfinite(t).all() for t in self.merged_tensors().values()):
            raise MergeError("merging would put inf/NaN into the base; the adapter weights have diverged")

    def merge(self) -> None:
        raise MergeError(f"{type(self).__name__} cannot be merged")

    def unmerge(self) -> None:
        """Undo ``merge`` (a no-op when not merged)."""
