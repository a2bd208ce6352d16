"""Bottleneck adapters: Houlsby et al. 2019 (arXiv 1902.00751) and Pfeiffer et al. 2020 (arXiv 2005.00247), placed
as AdapterHub ``adapters`` 1.3 places them (``DoubleSeqBnConfig`` and ``SeqBnConfig``, by Pfeiffer et al.'s group).

Both compute ``a(h) = up(act(down(h)))``; ``up`` starts at zero, so the adapted model starts as the base model. With
``x`` the residual stream entering a sublayer and ``d`` the sublayer's output after its dropout:

- Houlsby: one adapter after the attention and one after the feed-forward sublayer of every block, on the dropped-out
  output: ``d + a(d)``, then the block's own residual ``x + ...`` (and, in post-LN BERT, its LayerNorm).
- Pfeiffer: one adapter per block, after the feed-forward sublayer, reading the block's output ``y = x + d``:
  ``y + a(y)`` in pre-LN models (Llama, GPT-2); ``LN(x + d + a(LN(x + d)))`` in post-LN BERT, whose LayerNorm is
  applied again.

The adapter is a child of the module it targets (so its tensors are named after it) and works through a forward
hook: on the target's own output, or, in a BERT-style output module (``LayerNorm(dropout(dense(h)) + x)``), on its
``dropout`` (Houlsby) or its ``LayerNorm`` (Pfeiffer).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BottleneckConfig, ConfigError
from .base import LINEAR_TYPES, Conv1D
from .inserted import InsertedAdapter

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


@dataclasses.dataclass(frozen=True)
class Family:
    """Where the adapters go in one model family; paths after ``block`` are relative to one transformer block."""

    block: str  # regex of a block's full path
    attention: str  # the attention sublayer (Houlsby)
    feed_forward: str  # the feed-forward sublayer (Houlsby)
    pfeiffer: str  # Pfeiffer's target: "" is the block itself
    adapterhub: tuple[str, str]  # AdapterHub's module names for the attention and the output adapters


FAMILIES: dict[str, Family] = {
    "llama": Family(r".*\.layers\.\d+", "self_attn", "mlp", "", ("attention_adapters", "output_adapters")),
    "gpt2": Family(r".*\.h\.\d+", "attn", "mlp", "", ("attention_adapters", "output_adapters")),
    "bert": Family(r".*\.layer\.\d+", "attention.output", "output", "output", ("attention.output", "output")),
}


class BottleneckAdapter(InsertedAdapter):
    """One bottleneck adapter; ``adapter_down``/``adapter_up`` are its two projections.

    ``hook_at`` is the module, relative to the target, whose output the adapter reads; with ``renormalize`` that
    module is a LayerNorm and the adapter's output is added to its input and normalized again (Pfeiffer, post-LN).
    """

    attach_name = "bottleneck_adapter"

    def __init__(
        self, hidden_size: int, config: BottleneckConfig, hook_at: str = "", renormalize: bool = False
    ) -> None:
        super().__init__(config)
        bottleneck = max(1, hidden_size // config.reduction_factor)
        self.adapter_down = nn.Linear(hidden_size, bottleneck)
        self.activation = ACTIVATIONS[config.nonlinearity]()
        self.adapter_up = nn.Linear(bottleneck, hidden_size)
        nn.init.normal_(self.adapter_down.weight, std=1e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.hook_at = hook_at
        self.renormalize = renormalize

    def bottleneck(self, h: Tensor) -> Tensor:
        """``up(act(down(h)))``, computed in the adapter's dtype and returned in ``h``'s."""
        x = h.to(self.adapter_down.weight.dtype)
        return self.adapter_up(self.activation(self.adapter_down(x))).to(h.dtype)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.bottleneck(h)

    def hooked_module(self, sublayer: nn.Module) -> nn.Module:
        return sublayer.get_submodule(self.hook_at)

    def rewrite_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self.renormalize:
            return super().rewrite_output(module, args, output)
        norm = module  # a LayerNorm: add the adapter to its input and normalize again (Pfeiffer, post-LN)
        return F.layer_norm(args[0] + self.bottleneck(output), norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def extra_repr(self) -> str:
        where = f"{self.hook_at or 'output'}{' (normalized again)' if self.renormalize else ''}"
        return f"reads={where}"


def output_size(module: nn.Module) -> int | None:
    """The width of ``module``'s output: a linear layer's out features; for any other module, those of the last
    linear layer inside it (an attention's output projection, a block's feed-forward down projection)."""
    linears = [m for m in module.modules() if isinstance(m, LINEAR_TYPES)]
    if not linears:
        return None
    last = linears[0] if isinstance(module, LINEAR_TYPES) else linears[-1]
    return last.weight.shape[1] if isinstance(last, Conv1D) else last.out_features


def is_post_ln_output(module: nn.Module) -> bool:
    """A BERT-style sublayer output, ``LayerNorm(dropout(dense(h)) + x)`` (BertSelfOutput, BertOutput, RoBERTa's...)."""
    children = dict(module.named_children())
    return {"dense", "dropout", "LayerNorm"} <= children.keys() and isinstance(children["LayerNorm"], nn.LayerNorm)


def build_bottleneck(sublayer: nn.Module, config: BottleneckConfig, path: str) -> BottleneckAdapter:
    """The adapter for target ``sublayer``, reading where AdapterHub's adapter would (see the module docstring)."""
    hidden = output_size(sublayer)
    if hidden is None:
        raise ConfigError(
            f"Cannot tell the output size of {path} ({type(sublayer).__name__}); target a sublayer that ends in a "
            "linear layer (an attention, a feed-forward block, a transformer block or an nn.Linear) instead."
        )
    hook_at, renormalize = "", False
    if is_post_ln_output(sublayer):
        hook_at, renormalize = ("LayerNorm", True) if config.method == "pfeiffer" else ("dropout", False)
    module = BottleneckAdapter(hidden, config, hook_at, renormalize)
    weight = next((m.weight for m in sublayer.modules() if isinstance(m, LINEAR_TYPES)), None)
    if weight is not None and weight.is_floating_point():
        module.to(device=weight.device)
    return module


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def model_family(model: nn.Module) -> tuple[Family, list[str]] | None:
    """The first family in ``FAMILIES`` whose blocks ``model`` has, with the blocks' paths; None for other models."""
    for family in FAMILIES.values():
        blocks = [p for p, m in model.named_modules() if re.fullmatch(family.block, p)
                  and _has(m, family.attention) and _has(m, family.feed_forward)]
        if blocks:
            return family, blocks
    return None


def default_sublayers(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Where the adapters go in a known model family (see the module docstring); empty for other models."""
    found = model_family(model)
    if found is None:
        return []
    family, blocks = found
    relative = [family.pfeiffer] if config.method == "pfeiffer" else [family.attention, family.feed_forward]
    return [f"{block}.{r}" if r else block for block in blocks for r in relative]


def from_adapterhub(model: nn.Module, tensors: Mapping[str, Tensor], method: str) -> dict[str, Tensor]:
    """AdapterHub bottleneck tensors (``<block>.<slot>.adapters.<name>.adapter_down.0.weight``, ...) under the names
    ``adapter_state_dict`` gives them once ``method``'s adapters are injected into ``model`` (its plain
    transformers model, not AdapterHub's)."""
    found = model_family(model)
    if found is None:
        raise ConfigError(f"{type(model).__name__} is not a model family whose AdapterHub names are known "
                          f"({', '.join(FAMILIES)}); pass the plain transformers model of one of them.")
    family = found[0]
    ours = dict(zip(family.adapterhub,
                    (family.attention, family.pfeiffer if method == "pfeiffer" else family.feed_forward)))
    slots = "|".join(re.escape(s) for s in family.adapterhub)
    pattern = re.compile(rf"(.+?)\.({slots})\.adapters\.[^.]+\.(adapter_down\.0|adapter_up)\.(weight|bias)")
    converted = {}
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise ConfigError(
                f"{key} is not an AdapterHub bottleneck tensor name of this model; pass only the adapter_down.0 and "
                "adapter_up weights and biases of one DoubleSeqBnConfig (houlsby) or SeqBnConfig (pfeiffer) adapter."
            )
        block, slot, projection, kind = match.groups()
        target = f"{block}.{ours[slot]}" if ours[slot] else block
        converted[f"{target}.{BottleneckAdapter.attach_name}.{projection.split('.')[0]}.{kind}"] = tensor
    return converted


def supports_bottleneck(module: nn.Module) -> bool:
    """Whether an adapter can follow ``module``: its output width is known."""
    return output_size(module) is not None

