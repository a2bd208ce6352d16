"""Base fingerprints: a short hash that tells whether an adapter is being put on the base it was trained on."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .methods.base import WeightAdapter, weight_sample
from .surgery import adapters, base_state_dict


@torch.no_grad()
def base_fingerprint(model: nn.Module, samples: int = 16) -> str:
    """A short hash of the base weights' names, shapes and a few values each.

    Values are rounded to bfloat16 so that a dtype cast does not change the fingerprint, and sampled so that a 1B
    model is fingerprinted in milliseconds. Adapted layers report their base weight without the update, exactly as it
    was before merging (``WeightAdapter.base_weight_sample``), so merging does not change the fingerprint.
    """
    digest = hashlib.sha256()
    layers = {f"{p}.weight" if p else "weight": a for p, a in adapters(model).items() if isinstance(a, WeightAdapter)}
    for key, tensor in sorted(base_state_dict(model).items()):
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        if tensor.is_meta or tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.dtype == torch.int64):
            continue
        sample = layers[key].base_weight_sample(samples) if key in layers else weight_sample(tensor, samples)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
