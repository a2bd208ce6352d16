"""PEFT as the reference implementation: build the same adapter in PEFT and copy tensors between it and ours.

Not a test module; the LoRA, DoRA, targeting and IO tests import it. PEFT is a test dependency only.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lightning_lora.io import file_tensors
from lightning_lora.surgery import adapters

ADAPTER = "default"

# Expected warnings from PEFT itself (its own notices, and its use of a transformers API deprecated in v5).
PEFT_WARNINGS = [
    "ignore:fan_in_fan_out is set to False but the target module is `Conv1D`:UserWarning",
    "ignore:Setting `save_embedding_layers` to `True`:UserWarning",
    "ignore:aLoRA is currently only supported for CAUSAL_LM task:UserWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    "ignore:Model has `tie_word_embeddings=True` and a tied layer is part of the adapter:UserWarning",
]


def peft_model(base: nn.Module, **lora_options: Any) -> nn.Module:
    """``peft.get_peft_model`` on a deep copy of ``base`` with ``LoraConfig(**lora_options)``, in eval mode."""
    import peft

    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_options)).eval()


def peft_inner(model: nn.Module) -> nn.Module:
    """The user's model inside a ``PeftModel`` (module paths there equal the paths in the original model)."""
    return model.base_model.model


def peft_adapted_paths(model: nn.Module) -> list[str]:
    """Paths (relative to the original model) of the modules PEFT turned into LoRA layers, in model order."""
    from peft.tuners.lora import LoraLayer

    return [path for path, module in peft_inner(model).named_modules() if isinstance(module, LoraLayer)]


def peft_tensor(model: nn.Module, key: str) -> Tensor:
    """The PEFT tensor for one of our adapter file keys (``io.file_tensors``), e.g. ``layers.0.q_proj.lora_A.weight``.

    Ours: ``<path>.lora_A.weight``, ``<path>.lora_embedding_A``, ``<path>.lora_magnitude_vector``.
    PEFT: ``lora_A[adapter].weight``, ``lora_embedding_A[adapter]``, ``lora_magnitude_vector[adapter].weight``.
    """
    inner = peft_inner(model)
    for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
        if marker in key:
            path, _, rest = key.partition(marker)
            layer = inner.get_submodule(path)
            holder = getattr(layer, marker.strip("."))[ADAPTER]
            if marker == ".lora_magnitude_vector":
                return holder.weight
            return getattr(holder, rest) if rest else holder
    raise KeyError(key)


def ours_to_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy every adapter tensor of ``ours`` into the matching PEFT tensor (shapes must agree)."""
    with torch.no_grad():
        for key, tensor in file_tensors(adapters(ours)).items():
            target = peft_tensor(theirs, key)
            assert target.shape == tensor.shape, (key, target.shape, tensor.shape)
            target.copy_(tensor)


def adapter_grads(ours: nn.Module, theirs: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """(key, our grad, PEFT's grad) for every adapter tensor of ``ours``."""
    return [(key, tensor.grad, peft_tensor(theirs, key).grad) for key, tensor in file_tensors(adapters(ours)).items()]


def randomize_adapters(model: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Give every adapter tensor random values (so no update is zero) from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters(model).values():
            for name, tensor in adapter.adapter_tensors().items():
                noise = torch.randn(tensor.shape, generator=gen) * scale
                if name.endswith("lora_magnitude_vector"):
                    tensor.mul_(1 + noise.clamp(-0.5, 0.5))  # a magnitude near the column norm, never zero
                else:
                    tensor.copy_(noise)


def logits(model: nn.Module, inputs: Tensor) -> Tensor:
    """The model's output tensor for ``inputs`` (``.logits`` for transformers models)."""
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


LossFn = Callable[[Tensor], Tensor]


def square_loss(out: Tensor) -> Tensor:
    """A loss that depends on every output element with a different weight."""
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return (out * weights).sum() + out.square().mean()
