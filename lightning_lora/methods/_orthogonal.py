"""What the multiplicative methods share: Cayley maps of skew-symmetric blocks, block-diagonal products applied to
row vectors, block dropout, and the parts of PEFT's ``adapter_config.json`` every one of them writes and reads.

Row-vector convention throughout: a linear layer computes ``x W^T``; an input transform ``x -> x T`` merges into the
weight as ``W T^T``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, _got, _is_int, _is_real, _plain, exact_targets


def skew(upper: Tensor, size: int) -> Tensor:
    """``(n, size, size)`` skew-symmetric matrices from their packed strict upper triangles ``(n, size*(size-1)/2)``,
    in ``torch.triu_indices`` order (PEFT's OFT layout)."""
    rows, cols = torch.triu_indices(size, size, 1, device=upper.device)
    matrix = upper.new_zeros(upper.shape[0], size, size)
    matrix[:, rows, cols] = upper
    return matrix - matrix.transpose(-2, -1)


def packed(matrix: Tensor) -> Tensor:
    """The inverse of ``skew``: the strict upper triangles of ``(n, b, b)`` matrices."""
    rows, cols = torch.triu_indices(matrix.shape[-1], matrix.shape[-1], 1, device=matrix.device)
    return matrix[:, rows, cols]


def cayley(q: Tensor) -> Tensor:
    """The Cayley map ``(I - Q)(I + Q)^-1`` of skew-symmetric ``(n, b, b)`` blocks: orthogonal blocks, ``I`` at 0.
    Solved in float32 for half-precision blocks (DeepSpeed's bf16 mode casts the adapter itself; CUDA's LU has no
    bf16/fp16 kernel) and returned in ``q``'s dtype."""
    dtype = q.dtype
    q = q.float() if dtype in (torch.float16, torch.bfloat16) else q
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False).to(dtype)


def cayley_neumann(q: Tensor, terms: int) -> Tensor:
    """PEFT's truncated Neumann series for OFT's Cayley map (no inverse; orthogonal up to ``O(|Q|^terms)``):
    ``I + 2Q + 2Q^2 + ... + 2Q^(terms-2) + Q^(terms-1)``, with PEFT's quirk that 3 and 4 terms both end in ``Q^3``."""
    r = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if terms <= 1:
        return r.clone()
    r = r + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


def rotate_blocks(x: Tensor, blocks: Tensor) -> Tensor:
    """``x @ block_diag(*blocks)`` for ``x`` of shape ``(..., n*b)`` and ``blocks`` ``(n, b, b)``, without the dense
    block-diagonal matrix."""
    n, b, _ = blocks.shape
    return torch.einsum("...nk,nkc->...nc", x.reshape(*x.shape[:-1], n, b), blocks).reshape(x.shape)


def drop_blocks(blocks: Tensor, p: float) -> Tensor:
    """Multiplicative dropout (OFT/BOFT papers): ``int(p * n)`` of the ``n`` blocks, chosen at random, become ``I``."""
    n, b, _ = blocks.shape
    mask = torch.zeros(n, device=blocks.device, dtype=blocks.dtype)
    mask[: int(p * n)] = 1
    mask = mask[torch.randperm(n)].view(n, 1, 1)
    return (1 - mask) * blocks + mask * torch.eye(b, device=blocks.device, dtype=blocks.dtype)


def divisors_near(n: int, wanted: int, count: int = 3) -> list[int]:
    """The divisors of ``n`` closest to ``wanted`` (for error messages that say what would work)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - wanted), d))[:count])


# -- option checks and PEFT's adapter_config.json, the parts all four methods share --------------------------
def non_negative_int(option: str, value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{option} must be a non-negative integer such as 8 (0: derive it), {_got(value)}.")
    return _plain(value)


def flag(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{option} must be true or false, {_got(value)}.")
    return value


def probability(option: str, value: Any) -> float:
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{option} must be a probability in [0, 1) such as 0.1, {_got(value)}.")
    return _plain(value)



def peft_file_dict(peft_type: str, layers: Mapping[str, Any], module_paths: Iterable[str],
                   model_info: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for exactly the adapted ``layers`` (their paths as targets, see
    ``config.exact_targets``), with the method's own ``fields``."""
    target_spec, _ = exact_targets(list(layers), module_paths)
    return {
        "peft_type": peft_type,
        "task_type": model_info.get("task_type"),
        "base_model_name_or_path": model_info.get("base_model_name_or_path"),
        "target_modules": target_spec,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
        **fields,
    }


def common_peft_options(data: Mapping[str, Any], peft_type: str) -> dict[str, Any]:
    """The targeting options of a PEFT config of ``peft_type``; PEFT options that change what the file holds or how
    the model computes (trained biases, extra saved modules) are refused by name."""
    if data.get("modules_to_save"):
        raise ConfigError(f"PEFT {peft_type} adapter saves modules_to_save={data['modules_to_save']}, which "
                          "lightning_lora does not support yet.")
    if data.get("bias", "none") != "none":
        raise ConfigError(f"PEFT {peft_type} adapter trains biases (bias={data['bias']!r}); only bias='none' is "
                          "supported.")
    if data.get("target_modules") is None:
        raise ConfigError(f"PEFT {peft_type} config has no target_modules (PEFT then picks defaults per model type, "
                          "which lightning_lora does not guess); set target_modules, e.g. ['q_proj', 'v_proj'].")
    return {k: data.get(k) for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")}
