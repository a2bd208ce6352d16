"""LLaMA-Adapter (Zhang et al. 2023, arXiv 2303.16199) as PEFT's ``ADAPTION_PROMPT``.

In each of the top ``adapter_layers`` attention layers, ``adapter_len`` learnable prompt vectors ``P`` (hidden size)
are projected by the layer's own key and value projections; the layer's queries attend to them in a separate softmax
whose result is scaled by a learnable gate ``g`` that starts at zero (the paper's zero-init attention):

    out = attention(x) + W_o (g * softmax(Q K_P^T / sqrt(d)) V_P)        (Llama; GPT-2 adds it without W_o, as PEFT)

With ``g = 0`` the model's output is exactly the base model's. The adapter is a forward hook on the attention module
(it needs the call's ``hidden_states`` and ``position_embeddings``), so nothing of the base is replaced; PEFT instead
wraps the attention module. Its tensors are PEFT's: ``<attention>.adaption_prompt`` (1, len, hidden) and
``<attention>.adaption_gate`` (1,).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, ConfigError, _got, _positive_int, register_config
from .inserted import InsertedAdapter

ATTENTION_NAMES = ("self_attn", "attn")  # Llama/Mistral/Qwen, GPT-2: where PEFT's TRANSFORMERS_MODEL_CONFIG looks


@register_config
@dataclass
class LlamaAdapterConfig(AdapterConfig):
    """LLaMA-Adapter: ``adapter_len`` prompt vectors in each of the top ``adapter_layers`` attention modules (None:
    every one). ``target_modules`` is the attention module's name (one name, as PEFT's: ``"self_attn"``); None finds
    ``self_attn`` (Llama-style) or ``attn`` (GPT-2)."""

    method: str = "llama_adapter"
    adapter_len: int = 10
    adapter_layers: int | None = None

    METHODS: ClassVar[tuple[str, ...]] = ("llama_adapter",)
    PEFT_TYPE: ClassVar[str | None] = "ADAPTION_PROMPT"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.target_modules
        if isinstance(name, list):
            if len(name) != 1:
                raise ConfigError(f"target_modules for llama_adapter is the one attention module name (e.g. "
                                  f"'self_attn'), got {name}; adapter_layers chooses how many layers get prompts.")
            name = name[0]
        if name is not None and not re.fullmatch(r"[\w.]+", name):
            raise ConfigError(f"target_modules for llama_adapter is an attention module name such as 'self_attn', not "
                              f"a pattern, {_got(name)}.")
        self.target_modules = name
        for option in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            if getattr(self, option) is not None:
                raise ConfigError(f"llama_adapter takes no {option}: it adapts the top adapter_layers attention "
                                  f"modules (PEFT's rule); set adapter_layers instead.")
        self.adapter_len = _positive_int("adapter_len", self.adapter_len)
        if self.adapter_layers is not None:
            self.adapter_layers = _positive_int("adapter_layers", self.adapter_layers)

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str],
                  model_info: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's ``AdaptionPromptConfig``: the attention name and the number of layers adapted."""
        name = next(iter(layers)).rsplit(".", 1)[-1]
        return {"peft_type": "ADAPTION_PROMPT", "task_type": model_info.get("task_type"),
                "base_model_name_or_path": model_info.get("base_model_name_or_path"), "target_modules": name,
                "adapter_len": self.adapter_len, "adapter_layers": len(layers), "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LlamaAdapterConfig:
        return cls(target_modules=data.get("target_modules"), adapter_len=data.get("adapter_len", 10),
                   adapter_layers=data.get("adapter_layers"))


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _style(attention: nn.Module) -> str | None:
    """``"llama"`` (q/k/v/o projections and rotary embeddings given to forward) or ``"gpt2"`` (fused ``c_attn``)."""
    children = dict(attention.named_children())
    if {"q_proj", "k_proj", "v_proj", "o_proj"} <= children.keys() and hasattr(attention, "head_dim"):
        return "llama"
    if "c_attn" in children and hasattr(attention, "split_size") and hasattr(attention, "head_dim"):
        return "gpt2"
    return None


class AdaptionPrompt(InsertedAdapter):
    """The prompt and gate of one attention module; the hook adds the gated prompt attention to its output."""

    attach_name = "adaption"

    def __init__(self, config: LlamaAdapterConfig, hidden_size: int, style: str) -> None:
        super().__init__(config)
        # standard normal, as the official code's nn.Embedding and PEFT; the gate starts at zero (zero-init attention)
        self.adaption_prompt = nn.Parameter(torch.randn(1, config.adapter_len, hidden_size))
        self.adaption_gate = nn.Parameter(torch.zeros(1))
        self.style = style

    def file_tensors(self) -> dict[str, Tensor]:
        return {"adaption_prompt": self.adaption_prompt, "adaption_gate": self.adaption_gate}

    def rewrite_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = output[0] if isinstance(output, tuple) else output
        prompted = self._llama(module, hidden, kwargs) if self.style == "llama" else self._gpt2(module, hidden)
        new = (out + prompted).to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, head_dim: int) -> Tensor:
        """``g * softmax(Q K^T / sqrt(d)) V`` over the prompt, heads merged: (batch, q_len, heads * head_dim)."""
        scores = query @ key.transpose(2, 3).to(query.dtype) / math.sqrt(head_dim)
        scores = self.adaption_gate.to(query.dtype) * torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = scores @ value.to(query.dtype)
        return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)

    def _llama(self, module: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        batch, q_len, _ = hidden.shape
        head_dim = module.head_dim
        prompt = self.adaption_prompt.to(module.k_proj.weight.dtype)
        kv_heads = module.k_proj.out_features // head_dim
        heads = module.q_proj.out_features // head_dim

        def spread(states: Tensor) -> Tensor:  # (1, len, kv_heads*d) -> (batch, heads, len, d), GQA groups repeated
            states = states.view(1, -1, kv_heads, head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
            return states.repeat_interleave(heads // kv_heads, dim=1)

        key, value = spread(module.k_proj(prompt)), spread(module.v_proj(prompt))
        query = module.q_proj(hidden).view(batch, q_len, heads, head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query = query * cos + _rotate_half(query) * sin
        return module.o_proj(self._attend(query, key, value, head_dim))

    def _gpt2(self, module: nn.Module, hidden: Tensor) -> Tensor:
        batch, q_len, width = hidden.shape
        head_dim = module.head_dim
        prompt = self.adaption_prompt.to(module.c_attn.weight.dtype)
        _, key, value = module.c_attn(prompt).split(module.split_size, dim=2)
        key = key.view(1, -1, width // head_dim, head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        value = value.view(1, -1, width // head_dim, head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        query = module.c_attn(hidden).split(module.split_size, dim=2)[0]
        query = query.view(batch, q_len, -1, head_dim).transpose(1, 2)
        return self._attend(query, key, value, head_dim)

    def extra_repr(self) -> str:
        return f"adapter_len={self.adaption_prompt.shape[1]}, style={self.style}"


def find_targets(model: nn.Module, config: LlamaAdapterConfig) -> list[str]:
    """The top ``adapter_layers`` attention modules: paths ending in ``.<target_modules>`` in model order (PEFT's
    rule), or in ``.self_attn`` / ``.attn`` when no name is given."""
    names = [config.target_modules] if config.target_modules else list(ATTENTION_NAMES)
    for name in names:
        found = [p for p, _ in model.named_modules() if p == name or p.endswith(f".{name}")]
        if found:
            break
    else:
        raise ConfigError(
            f"{type(model).__name__} has no attention module named {' or '.join(map(repr, names))}; set "
            "target_modules to the name of its attention modules (e.g. 'self_attn')."
        )
    wanted = config.adapter_layers or len(found)
    if wanted > len(found):
        raise ConfigError(f"adapter_layers={wanted} but {type(model).__name__} has only {len(found)} attention "
                          f"modules named {name!r}; use at most {len(found)}.")
    return found[-wanted:]


def build_llama_adapter(attention: nn.Module, config: LlamaAdapterConfig, path: str) -> AdaptionPrompt:
    """The prompt and gate for attention module ``attention``, on its device."""
    style = _style(attention)
    if style is None:
        raise ConfigError(
            f"{path} ({type(attention).__name__}) is not an attention module llama_adapter knows: it needs q_proj, "
            "k_proj, v_proj and o_proj (Llama, Mistral, Qwen) or GPT-2's c_attn. Name the attention modules with "
            "target_modules."
        )
    weight = (attention.q_proj if style == "llama" else attention.c_attn).weight
    hidden = weight.shape[1] if style == "llama" else weight.shape[0]
    return AdaptionPrompt(config, hidden, style).to(device=weight.device)


def supports_llama_adapter(module: nn.Module) -> bool:
    return _style(module) is not None
