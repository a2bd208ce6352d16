"""A hash of everything about a model that an operation which fails must leave alone.

Not a test module. Our promise is that a refused input leaves the model exactly as it was; comparing
``model_state_hash`` before and after a failing call checks that in one line, across parameters, buffers,
module types, the module tree, ``requires_grad`` flags, train/eval mode and attached forward hooks.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def model_state_hash(model: nn.Module) -> str:
    """SHA-256 over every module (path, class, training flag, number of forward hooks and pre-hooks), every parameter
    (path, dtype, shape, ``requires_grad``, bytes) and every buffer (path, dtype, shape, bytes), shared ones under
    each of their names, so that retying or untying weights changes the hash as well."""
    digest = hashlib.sha256()

    def add(*parts: object) -> None:
        digest.update(repr(parts).encode())

    for path, module in model.named_modules(remove_duplicate=False):
        add("module", path, type(module).__module__, type(module).__qualname__, module.training,
            len(module._forward_hooks), len(module._forward_pre_hooks))
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        add("param", name, str(param.dtype), tuple(param.shape), param.requires_grad, seen.setdefault(id(param), name))
        digest.update(_tensor_bytes(param))
    for name, buffer in model.named_buffers(remove_duplicate=False):
        add("buffer", name, str(buffer.dtype), tuple(buffer.shape), seen.setdefault(id(buffer), name))
        digest.update(_tensor_bytes(buffer))
    return digest.hexdigest()
