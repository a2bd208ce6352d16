"""Prompt tuning (Lester et al. 2021, arXiv 2104.08691) as PEFT's ``PROMPT_TUNING``.

``num_virtual_tokens`` learned embeddings are put before the embedded input. A forward pre-hook on the model turns
``input_ids`` into ``inputs_embeds`` with the prompt prepended, and prepends ones to a 2-D ``attention_mask`` and
``-100`` to ``labels`` (so the loss is over the real tokens only), as PEFT's ``PeftModelForCausalLM`` does; the
model's outputs (logits, hidden states) therefore have ``num_virtual_tokens`` more positions at the front. Explicit
``position_ids``/``token_type_ids`` are dropped, as in PEFT. In ``generate``, the first step runs the prompt into the
cache; later steps (a non-empty cache) only get the mask prefix.

Initialization (``prompt_tuning_init``): ``RANDOM`` (standard normal, as PEFT's ``nn.Embedding``), ``TEXT`` (the
model's embeddings of ``prompt_tuning_init_text`` tokenized by ``tokenizer_name_or_path``, a tokenizer object or a
local path, repeated or cut to length, as the paper's class-label/vocabulary init), or ``SAMPLE_VOCAB`` (embeddings
of random vocabulary tokens).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, ConfigError, _got, _positive_int, register_config
from .inserted import InsertedAdapter, keyword_arguments, refuse_targets

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@register_config
@dataclass
class PromptConfig(AdapterConfig):
    """Prompt tuning: ``num_virtual_tokens`` soft prompt embeddings, initialized by ``prompt_tuning_init``."""

    method: str = "prompt"
    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None  # a local tokenizer path, or a tokenizer object (Python API only)

    METHODS: ClassVar[tuple[str, ...]] = ("prompt",)
    PEFT_TYPE: ClassVar[str | None] = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_targets(self, "the prompt is put before the model's input embeddings")
        self.num_virtual_tokens = _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        init = self.prompt_tuning_init
        if not isinstance(init, str) or init.upper() not in INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {', '.join(INITS)}, {_got(init)}.")
        self.prompt_tuning_init = init.upper()
        if self.prompt_tuning_init == "TEXT":
            if not isinstance(self.prompt_tuning_init_text, str) or not self.prompt_tuning_init_text:
                raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text whose token "
                                  f"embeddings start the prompt, {_got(self.prompt_tuning_init_text)}.")
            if self.tokenizer_name_or_path is None:
                raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path: the model's tokenizer "
                                  "(a local path or the tokenizer object) to turn prompt_tuning_init_text into tokens.")
            tokenizer = self.tokenizer_name_or_path
            if not isinstance(tokenizer, str) and not callable(tokenizer):
                raise ConfigError(f"tokenizer_name_or_path must be a tokenizer path or a tokenizer, {_got(tokenizer)}.")
        elif self.prompt_tuning_init_text is not None:
            raise ConfigError(f"prompt_tuning_init_text is used only with prompt_tuning_init='TEXT' (got "
                              f"{self.prompt_tuning_init!r}); set prompt_tuning_init='TEXT' or drop the text.")

    def to_dict(self) -> dict[str, Any]:
        """Our JSON form; a tokenizer object is written as its ``name_or_path``."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["tokenizer_name_or_path"] = _tokenizer_name(self.tokenizer_name_or_path)
        return data

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str],
                  model_info: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's ``PromptTuningConfig`` (the file holds the trained prompt, so the init only documents it)."""
        prompt = layers[""]
        return {"peft_type": "PROMPT_TUNING", "task_type": model_info.get("task_type"),
                "base_model_name_or_path": model_info.get("base_model_name_or_path"),
                "num_virtual_tokens": self.num_virtual_tokens, "token_dim": prompt.embedding.embedding_dim,
                "num_transformer_submodules": 1, "num_attention_heads": prompt.num_attention_heads,
                "num_layers": prompt.num_layers, "prompt_tuning_init": self.prompt_tuning_init,
                "prompt_tuning_init_text": self.prompt_tuning_init_text,
                "tokenizer_name_or_path": _tokenizer_name(self.tokenizer_name_or_path), "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> PromptConfig:
        if data.get("num_transformer_submodules", 1) not in (1, None):
            raise ConfigError("PEFT prompt adapter is for an encoder-decoder model (num_transformer_submodules=2); "
                              "lightning_lora supports decoder-only models.")
        # a saved adapter holds the trained prompt: its init (which may name a tokenizer on the Hub) is not rerun
        return cls(num_virtual_tokens=data.get("num_virtual_tokens", 20))


def _tokenizer_name(tokenizer: Any) -> str | None:
    return tokenizer if isinstance(tokenizer, (str, type(None))) else getattr(tokenizer, "name_or_path", None) or None


def _init_token_ids(config: PromptConfig, vocab_size: int) -> list[int] | None:
    """The vocabulary tokens whose embeddings start the prompt (PEFT's rule: the text's tokens repeated and cut to
    ``num_virtual_tokens``); None for ``RANDOM``."""
    n = config.num_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (n,)).tolist()
    if config.prompt_tuning_init != "TEXT":
        return None
    tokenizer = config.tokenizer_name_or_path
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            raise ConfigError(f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} could not be loaded ({err}); "
                              "give a local tokenizer directory or pass the tokenizer object.") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens; give some text.")
    if max(ids) >= vocab_size:
        raise ConfigError(f"The tokenizer gives token id {max(ids)}, outside the model's vocabulary of {vocab_size}: "
                          "tokenizer_name_or_path is not this model's tokenizer.")
    return (ids * math.ceil(n / len(ids)))[:n]


class PromptEmbedding(InsertedAdapter):
    """The soft prompt (PEFT's ``PromptEmbedding``: one ``embedding``)."""

    attach_name = "prompt_encoder"
    rewrites = ("inputs",)

    def __init__(self, config: PromptConfig, word_embeddings: nn.Module, num_layers: int, num_attention_heads: int):
        super().__init__(config)
        self.num_virtual_tokens = config.num_virtual_tokens
        self.num_layers, self.num_attention_heads = num_layers, num_attention_heads
        self.embedding = nn.Embedding(config.num_virtual_tokens, word_embeddings.embedding_dim)
        ids = _init_token_ids(config, word_embeddings.num_embeddings)
        if ids is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(word_embeddings.weight[torch.tensor(ids)].float())

    def file_tensors(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.embedding.weight}

    def rewrite_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        call = keyword_arguments(module, args, kwargs)
        n = self.num_virtual_tokens
        cache = call.get("cache", call.get("past_key_values"))
        mask = call.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            call["attention_mask"] = torch.cat((mask.new_ones(mask.shape[0], n), mask), dim=1)
        for unsupported in ("position_ids", "token_type_ids"):  # PEFT drops them too: they would not line up
            if call.get(unsupported) is not None:  # (the model counts positions from 0 over prompt and input)
                call[unsupported] = None
        if cache is not None and cache.get_seq_length() > 0:  # generating: the prompt is in the cache already
            return (), call
        embeds = call.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(call.pop("input_ids"))
        call["input_ids"] = None
        prompt = self.embedding.weight.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        call["inputs_embeds"] = torch.cat((prompt, embeds), dim=1)
        labels = call.get("labels")
        if labels is not None:
            call["labels"] = torch.cat((labels.new_full((labels.shape[0], n), -100), labels), dim=1)
        return (), call

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"


def build_prompt(model: nn.Module, config: PromptConfig, path: str) -> PromptEmbedding:
    """The soft prompt for ``model``, in the width of its input embeddings."""
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if not isinstance(embeddings, nn.Embedding):
        raise ConfigError(
            f"{type(model).__name__} has no input embeddings (get_input_embeddings()); prompt tuning needs a "
            "transformers model that takes inputs_embeds (e.g. LlamaForCausalLM, GPT2LMHeadModel)."
        )
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    module = PromptEmbedding(config, embeddings, getattr(text, "num_hidden_layers", 0),
                             getattr(text, "num_attention_heads", 0))
    return module.to(device=embeddings.weight.device)


def supports_prompt(module: nn.Module) -> bool:
    return callable(getattr(module, "get_input_embeddings", None))
