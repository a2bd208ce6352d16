"""Prefix tuning (Li and Liang 2021, arXiv 2101.00190) as PEFT's ``PREFIX_TUNING``.

Every attention layer attends to ``num_virtual_tokens`` learned key/value vectors before the real tokens. As in PEFT,
they enter the model as the first entries of its key/value cache: a forward pre-hook on the model fills the cache
the model is given (or a new ``DynamicCache``) with the prefix when it is empty, and prepends ones to a 2-D
``attention_mask``. The prefix is one ``embedding`` of ``(num_virtual_tokens, layers * 2 * kv_width)``, or with
``prefix_projection`` the paper's reparameterization: a smaller embedding through a two-layer tanh MLP
(``transform``) of width ``encoder_hidden_size``.

Generation works unchanged: ``generate`` hands the model an empty cache on the first step (the hook fills it) and the
same cache, now holding the prefix, afterwards. A cache that is not empty is taken to hold the prefix already.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, ConfigError, _got, _positive_int, register_config
from .inserted import InsertedAdapter, keyword_arguments, refuse_targets


@register_config
@dataclass
class PrefixConfig(AdapterConfig):
    """Prefix tuning: ``num_virtual_tokens`` key/value vectors per layer; ``prefix_projection`` trains them through
    an MLP of width ``encoder_hidden_size`` (None: the key/value width), as the paper does for stability."""

    method: str = "prefix"
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    METHODS: ClassVar[tuple[str, ...]] = ("prefix",)
    PEFT_TYPE: ClassVar[str | None] = "PREFIX_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_targets(self, "the prefix enters every attention layer through the model's key/value cache")
        self.num_virtual_tokens = _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be true or false, {_got(self.prefix_projection)}.")
        if self.encoder_hidden_size is not None:
            self.encoder_hidden_size = _positive_int("encoder_hidden_size", self.encoder_hidden_size)

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str],
                  model_info: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's ``PrefixTuningConfig`` with the shapes PEFT derives from the model (key/value heads for GQA)."""
        prefix = layers[""]
        return {"peft_type": "PREFIX_TUNING", "task_type": model_info.get("task_type"),
                "base_model_name_or_path": model_info.get("base_model_name_or_path"),
                "num_virtual_tokens": self.num_virtual_tokens, "token_dim": prefix.kv_width,
                "num_transformer_submodules": 1, "num_attention_heads": prefix.kv_heads,
                "num_layers": prefix.num_layers, "encoder_hidden_size": prefix.encoder_hidden_size,
                "prefix_projection": self.prefix_projection, "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> PrefixConfig:
        # a saved adapter (inference_mode) holds the projected prefix only: the MLP was a training device
        projection = bool(data.get("prefix_projection")) and not data.get("inference_mode", False)
        if data.get("num_transformer_submodules", 1) not in (1, None):
            raise ConfigError("PEFT prefix adapter is for an encoder-decoder model (num_transformer_submodules=2); "
                              "lightning_lora supports decoder-only models.")
        return cls(num_virtual_tokens=data.get("num_virtual_tokens", 20), prefix_projection=projection,
                   encoder_hidden_size=data.get("encoder_hidden_size") if projection else None)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _cache_keyword(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache (``cache`` in transformers 5.x)."""
    parameters = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in parameters), None)


CHECKPOINTING = (
    "prefix tuning passes its prefix through the key/value cache, which transformers' gradient checkpointing drops "
    "inside checkpointed layers (the prefix would be silently ignored); turn gradient checkpointing off "
    "(model.gradient_checkpointing_disable()) or use prompt tuning, llama_adapter or lora."
)


def checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers model) has gradient checkpointing on."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


class PrefixEncoder(InsertedAdapter):
    """The key/value prefix of every layer (PEFT's ``PrefixEncoder``: ``embedding`` and, projected, ``transform``)."""

    attach_name = "prefix_encoder"
    rewrites = ("inputs",)

    def __init__(self, config: PrefixConfig, num_layers: int, kv_heads: int, head_dim: int, cache_keyword: str) -> None:
        super().__init__(config)
        self.num_virtual_tokens = config.num_virtual_tokens
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.kv_width = kv_heads * head_dim
        self.encoder_hidden_size = config.encoder_hidden_size or self.kv_width
        self.cache_keyword = cache_keyword
        width = num_layers * 2 * self.kv_width
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, self.kv_width)
            self.transform = nn.Sequential(nn.Linear(self.kv_width, self.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, width))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            self.transform = None

    def prefix(self) -> Tensor:
        """``(num_virtual_tokens, layers * 2 * kv_width)``: per token, each layer's key then value."""
        return self.embedding.weight if self.transform is None else self.transform(self.embedding.weight)

    def file_tensors(self) -> dict[str, Tensor]:
        """PEFT's file holds the prefix itself (projected: the MLP is not saved, as in PEFT)."""
        return {"prompt_embeddings": self.prefix() if self.transform is None else self.prefix().detach()}

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Each layer's ``(key, value)``, shaped ``(batch, kv_heads, num_virtual_tokens, head_dim)`` as PEFT's."""
        states = self.prefix().to(dtype).view(1, self.num_virtual_tokens, self.num_layers * 2, self.kv_heads,
                                              self.head_dim)
        states = states.permute(2, 0, 3, 1, 4).expand(-1, batch, -1, -1, -1)
        return [(states[2 * i], states[2 * i + 1]) for i in range(self.num_layers)]

    def rewrite_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        if module.training and torch.is_grad_enabled() and checkpointing(module):
            raise RuntimeError(CHECKPOINTING)
        call = keyword_arguments(module, args, kwargs)
        cache = call.pop("past_key_values", None) if self.cache_keyword == "cache" else None
        cache = call.get(self.cache_keyword, cache)
        if call.get("use_cache") is False:  # every call is a whole forward (the cache given back is ours, stale)
            cache = None
        reference = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
        batch = reference.shape[0]
        if cache is None or cache.get_seq_length() == 0:
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=module.config)
            dtype = getattr(module, "dtype", self.embedding.weight.dtype)  # the base's, as PEFT casts the prefix
            for layer, (key, value) in enumerate(self.key_values(batch, dtype)):
                cache.update(key, value, layer)
        call[self.cache_keyword] = cache
        mask = call.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            ones = mask.new_ones(mask.shape[0], self.num_virtual_tokens)
            call["attention_mask"] = torch.cat((ones, mask), dim=1)
        if call.get("position_ids") is not None:  # positions continue after the prefix, as PEFT shifts them
            call["position_ids"] = call["position_ids"] + self.num_virtual_tokens
        return (), call

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, layers={self.num_layers}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, projection={self.transform is not None}")


def build_prefix(model: nn.Module, config: PrefixConfig, path: str) -> PrefixEncoder:
    """The prefix of a transformers decoder model, shaped from its config (key/value heads, head size, layers)."""
    text = _text_config(model)
    keyword = _cache_keyword(model)
    if text is None or keyword is None or not hasattr(text, "num_hidden_layers"):
        raise ConfigError(
            f"{type(model).__name__} is not a transformers decoder model whose forward takes a key/value cache; "
            "prefix tuning needs one (e.g. LlamaForCausalLM, GPT2LMHeadModel). For other models use lora or houlsby."
        )
    if getattr(text, "is_encoder_decoder", False):
        raise ConfigError(f"{type(model).__name__} is an encoder-decoder model; prefix tuning here supports decoder-only "
                          "models.")
    if checkpointing(model):
        raise ConfigError(CHECKPOINTING)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    module = PrefixEncoder(config, text.num_hidden_layers, kv_heads, head_dim, keyword)
    weight = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    return module.to(device=weight.device) if weight is not None else module


def supports_prefix(module: nn.Module) -> bool:
    return _cache_keyword(module) is not None if hasattr(module, "forward") else False
