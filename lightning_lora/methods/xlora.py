"""X-LoRA (Buehler and Buehler 2024, arXiv 2402.07148) as PEFT's ``XLORA``: a learned gating over frozen LoRA experts.

The experts are LoRA adapters already in the model (trained by this project and loaded under their names with
``load_adapter(model, directory, name=...)``). Every forward runs twice, as in the paper and PEFT:

1. the scaling pass, without gradients: every expert's input scaled by ``scaling_pass_value`` (0: the base model),
   keeping the last hidden state;
2. a classifier (``xlora_depth`` linear layers) maps that hidden state to per-token scalings over the experts (one set
   for all layers, or one per adapted layer with ``layerwise_scalings``), softmax with ``softmax_temperature``
   (``enable_softmax``), optionally only the ``top_k_lora`` best (renormalized with ``enable_softmax_topk``);
3. the real pass: each adapted layer adds ``sum_e B_e A_e (s_e * global_scaling_weight * x) * scaling_e``.

Only the classifier trains (``use_trainable_adapters``: the experts too). With ``LoRACallback(method="xlora")``
the LightningModule loads the experts (in ``__init__`` or ``configure_model``) and the callback adds X-LoRA beside
them under the name ``"xlora"``. The scalings reach the layers through
``AdaptedLayer.batch_route``, set by this adapter's input pre-hook on the model and cleared by its output hook. The
scaling pass recomputes the whole sequence, so the key/value cache is off while X-LoRA is attached (as PEFT requires).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, ConfigError, _got, _positive_int, _positive_real, register_config
from .base import AdaptedLayer
from .inserted import InsertedAdapter, keyword_arguments, refuse_targets


@register_config
@dataclass
class XLoRAConfig(AdapterConfig):
    """X-LoRA over the LoRA adapters named in ``experts`` (None: every adapter of the model, in the order added)."""

    method: str = "xlora"
    experts: list[str] | None = None
    hidden_size: int | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    layerwise_scalings: bool = False
    top_k_lora: int | None = None
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    use_trainable_adapters: bool = False

    METHODS: ClassVar[tuple[str, ...]] = ("xlora",)
    JOINS_ADAPTERS: ClassVar[bool] = True  # LoRACallback adds it beside the experts (under the name "xlora")

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str],
                  model_info: Mapping[str, Any]) -> dict[str, Any]:
        """Our own form: the options, with the experts' names and the hidden size filled in. The experts are saved
        beside it (``save_adapter`` writes each named adapter in its sub-folder) and must be loaded first."""
        classifier = layers[""]
        return {**self.to_dict(), "experts": list(classifier.experts), "hidden_size": classifier.hidden_size}

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_targets(self, "X-LoRA gates the LoRA experts where they are; choose them with experts")
        if self.experts is not None:
            if not isinstance(self.experts, (list, tuple)) or not self.experts or not all(
                    isinstance(e, str) and e for e in self.experts):
                raise ConfigError(f"experts must be a non-empty list of adapter names such as ['code', 'math'], "
                                  f"{_got(self.experts)}.")
            if len(set(self.experts)) != len(self.experts):
                raise ConfigError(f"experts lists an adapter twice: {list(self.experts)}.")
            self.experts = list(self.experts)
        if self.hidden_size is not None:
            self.hidden_size = _positive_int("hidden_size", self.hidden_size)
        for flag in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, {_got(getattr(self, flag))}.")
        self.softmax_temperature = _positive_real("softmax_temperature", self.softmax_temperature)
        if self.top_k_lora is not None:
            self.top_k_lora = _positive_int("top_k_lora", self.top_k_lora)
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise ConfigError("enable_softmax_topk renormalizes the top_k_lora best experts; set top_k_lora too.")
        self.xlora_depth = _positive_int("xlora_depth", self.xlora_depth)
        self.xlora_size = _positive_int("xlora_size", self.xlora_size)
        if not isinstance(self.xlora_dropout_p, (int, float)) or isinstance(self.xlora_dropout_p, bool) or \
                not 0 <= self.xlora_dropout_p < 1:
            raise ConfigError(f"xlora_dropout_p must be a probability in [0, 1), {_got(self.xlora_dropout_p)}.")
        for value in ("scaling_pass_value", "global_scaling_weight"):
            number = getattr(self, value)
            if not isinstance(number, (int, float)) or isinstance(number, bool) or not math.isfinite(number):
                raise ConfigError(f"{value} must be a finite number, {_got(number)}.")


class XLoRAClassifier(InsertedAdapter):
    """The classifier (PEFT's ``internal_xlora_classifier.layers``) and the two-pass forward around the model."""

    attach_name = "xlora_classifier"
    rewrites = ("inputs", "output")
    joins_adapters = True

    def __init__(self, config: XLoRAConfig, hidden_size: int, experts: list[str], layers: list[AdaptedLayer]) -> None:
        super().__init__(config)
        self.experts = experts
        self.hidden_size = hidden_size
        object.__setattr__(self, "_layers", layers)  # the adapted layers, in model order (not submodules of ours)
        width = len(experts) * (len(layers) if config.layerwise_scalings else 1)
        parts: list[nn.Module] = []
        size = hidden_size
        for _ in range(config.xlora_depth - 1):
            parts += [nn.Linear(size, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                parts.append(nn.Dropout(config.xlora_dropout_p))
            size = config.xlora_size
        self.layers = nn.Sequential(*parts, nn.Linear(size, width))
        object.__setattr__(self, "_scalings", None)  # (batch, seq, layers, experts) of the pass running now
        object.__setattr__(self, "_scaling_pass", False)
        object.__setattr__(self, "latest_scalings", None)  # the last forward's, for inspection (PEFT's)
        object.__setattr__(self, "_generation_cache", None)

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The experts stay frozen unless ``use_trainable_adapters``."""
        if self.config.use_trainable_adapters:
            return []
        return [p for layer in self._layers for n in self.experts if n in layer.adapters
                for p in layer.adapters[n].parameters()]

    def attach(self, sublayer: nn.Module) -> None:
        super().attach(sublayer)
        generation = getattr(sublayer, "generation_config", None)
        if generation is not None:  # the scaling pass needs the whole sequence at every step: no cache (as PEFT)
            object.__setattr__(self, "_generation_cache", (generation, generation.use_cache))
            generation.use_cache = False

    def detach(self, sublayer: nn.Module) -> None:
        self._route(None)
        if self._generation_cache is not None:
            generation, use_cache = self._generation_cache
            generation.use_cache = use_cache
            object.__setattr__(self, "_generation_cache", None)
        super().detach(sublayer)

    def _route(self, scalings: Tensor | None) -> None:
        object.__setattr__(self, "_scalings", scalings)
        for index, layer in enumerate(self._layers):
            layer.batch_route = None if scalings is None else _ExpertRoute(self, index)

    def layer_scalings(self, index: int) -> Tensor:
        """Layer ``index``'s scalings ``(batch, seq, experts)`` after top-k and its softmax (PEFT's
        ``get_maybe_topk_scalings``)."""
        scalings = self._scalings[:, :, index, :]  # in the scaling pass too, as PEFT does
        k = self.config.top_k_lora
        if k is not None:
            keep = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, scalings.topk(k, dim=-1).indices, True)
            scalings = scalings * keep.to(scalings.dtype)
        if self.config.enable_softmax_topk:
            nonzero = scalings != 0
            scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return scalings

    def rewrite_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if self._scaling_pass:
            return None
        if module.training and torch.is_grad_enabled() and _checkpointing(module):
            # the scalings are cleared when the forward ends, before a checkpointed layer is recomputed in backward
            raise RuntimeError("X-LoRA does not support gradient checkpointing yet: the recomputed layers would not "
                               "see the scalings. Turn it off (model.gradient_checkpointing_disable()).")
        call = keyword_arguments(module, args, kwargs)
        call.pop("past_key_values", None)
        call.pop("cache", None)
        call["use_cache"] = False
        reference = call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]
        batch, seq = reference.shape[:2]
        shape = (batch, seq, len(self._layers), len(self.experts))
        self._route(torch.full(shape, float(self.config.scaling_pass_value), device=reference.device))
        object.__setattr__(self, "_scaling_pass", True)
        try:
            with torch.no_grad():
                hidden = module(**{**call, "output_hidden_states": True, "return_dict": True}).hidden_states[-1]
        finally:
            object.__setattr__(self, "_scaling_pass", False)
            self._route(None)
        logits = self.layers(hidden.to(self.layers[-1].weight.dtype))
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, len(self._layers), -1)
        scalings = logits.reshape(shape)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        object.__setattr__(self, "latest_scalings", scalings)
        self._route(scalings)
        return (), call

    def rewrite_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not self._scaling_pass:
            self._route(None)
        return output

    def extra_repr(self) -> str:
        return f"experts={self.experts}, layers={len(self._layers)}"


def _checkpointing(model: nn.Module) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


class _ExpertRoute:
    """``AdaptedLayer.batch_route`` of one layer: each expert on its token-scaled input."""

    def __init__(self, classifier: XLoRAClassifier, index: int) -> None:
        self.classifier, self.index = classifier, index

    def __call__(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        classifier = self.classifier
        scalings = classifier.layer_scalings(self.index).reshape(-1, len(classifier.experts))
        weight = classifier.config.global_scaling_weight
        for e, name in enumerate(classifier.experts):
            update = layer.adapters[name] if name in layer.adapters else None
            if update is not None:
                out = update(layer, x * (scalings[:, e:e + 1] * weight).to(x.dtype), out)
        return out


def build_xlora(model: nn.Module, config: XLoRAConfig, path: str) -> XLoRAClassifier:
    """The classifier over ``model``'s LoRA experts, checked: each named adapter exists, is LoRA on linear layers
    and is not merged."""
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    names = list(dict.fromkeys(n for layer in layers for n in layer.adapters))
    experts = config.experts or names
    missing = [e for e in experts if e not in names]
    if not layers or missing:
        raise ConfigError(
            f"X-LoRA gates LoRA experts already in the model, and {type(model).__name__} has "
            f"{'none' if not names else 'no adapter named ' + ', '.join(map(repr, missing))} (it has "
            f"{names or 'no adapters'}). Load the experts first: load_adapter(model, directory, name='code'), ..."
        )
    layers = [layer for layer in layers if any(e in layer.adapters for e in experts)]
    for layer in layers:
        for name in experts:
            update = layer.adapters[name] if name in layer.adapters else None
            if update is None:
                continue
            if update.config.method != "lora" or layer.kind.family != "linear":
                raise ConfigError(f"X-LoRA expert {name!r} is {update.config.method} on a {layer.kind.family} layer; "
                                  "X-LoRA gates LoRA adapters of linear layers (as PEFT).")
            if update.merged:
                raise ConfigError(f"X-LoRA expert {name!r} is merged into the weights; unmerge(model) first.")
    hidden = config.hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is None:
        raise ConfigError(f"Cannot tell {type(model).__name__}'s hidden size; set hidden_size.")
    classifier = XLoRAClassifier(config, hidden, experts, layers)
    return classifier.to(device=layers[0].weight.device)


def supports_xlora(module: nn.Module) -> bool:
    return hasattr(module, "forward")
