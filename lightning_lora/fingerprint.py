"""Base fingerprints: which base model an adapter was trained on, robust to a dtype cast of that base.

A fingerprint is a small JSON string (it goes into safetensors metadata and checkpoints): a hash of the base's tensor
names and shapes, and a few sampled values of each tensor in its own dtype. ``compare_fingerprints`` requires equal
names and shapes; values must be equal where the dtypes are, and within one unit in the last place of the coarser
dtype where a cast changed them (a plain hash cannot do that: about 6% of bfloat16 values change in a float16 round
trip). Fingerprints of 16 hex digits (before this format) are still read and compared as before.

Merging does not change a fingerprint: a merged layer keeps its exact base (``AdaptedLayer.exact_base``), which is
what is sampled.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
from typing import Optional

import torch
from torch import Tensor, nn

SAMPLES = 16
VERSION = 2
MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
FLOAT16_SUBNORMAL = 2.0 ** -24  # float16 rounds everything below 2**-14 to a multiple of this

def sample(weight: Tensor, samples: int = SAMPLES) -> Tensor:
    """``samples`` evenly spaced values of ``weight``, in its dtype, on the CPU."""
    flat = weight.detach().reshape(-1)
    count = min(samples, flat.numel())
    # integer arithmetic: a float32 linspace rounds the last index past the end of tensors over 2**24 elements
    index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
    return flat[index].cpu()


def _is_plain(weight: Tensor) -> bool:
    return type(weight.data) is torch.Tensor and not weight.is_meta  # not quantized tensor subclasses


def _sampled(tensor: Tensor) -> bool:
    return not tensor.is_meta and tensor.numel() > 0 and (tensor.is_floating_point() or tensor.dtype == torch.int64)


@torch.no_grad()
def base_fingerprint(model: nn.Module, samples: int = SAMPLES) -> str:
    """The fingerprint of ``model``'s base (adapter tensors excluded, merged updates taken out), as a JSON string.

    Values are sampled so that a 1B model is fingerprinted in milliseconds. Merging does not change it: a merged
    layer reports the base sample kept before its first merge.
    """
    from .methods.base import AdaptedLayer  # imported here: the methods import this module
    from .surgery import adapters, base_state_dict

    layers = {f"{p}.weight" if p else "weight": a for p, a in adapters(model).items() if isinstance(a, AdaptedLayer)}
    # quantized layers without an adapter (quantize.FrozenQuantizedLinear) keep their original weight's sample too
    layers.update({f"{p}.weight": m for p, m in model.named_modules() if getattr(m, "source_sample", None) is not None
                   and p and f"{p}.weight" not in layers})
    structure, legacy = hashlib.sha256(), hashlib.sha256()
    tensors = []
    for key, tensor in sorted(base_state_dict(model).items()):
        entry = f"{key}:{tuple(tensor.shape)};".encode()
        structure.update(entry)
        legacy.update(entry)
        if not _sampled(tensor):
            continue
        values = _base_sample(layers[key], samples) if key in layers else sample(tensor, samples)
        legacy.update(values.to(torch.bfloat16).float().numpy().tobytes())  # the fingerprint before version 2
        raw = base64.b64encode(values.contiguous().view(torch.uint8).numpy().tobytes()).decode()
        tensors.append(f"{str(values.dtype).removeprefix('torch.')}:{raw}")
    return json.dumps({"version": VERSION, "structure": structure.hexdigest()[:16], "legacy": legacy.hexdigest()[:16],
                       "tensors": tensors}, separators=(",", ":"))


def _base_sample(layer: nn.Module, samples: int) -> Tensor:
    if not _is_plain(layer.weight) or getattr(layer, "source_sample", None) is not None:
        # a quantized base (quantize.py), or one PiSSA/OLoRA changed at injection: the original weight's sample
        return layer.source_sample
    # while adapters are merged, the layer keeps the exact base (methods/base.py): merging does not change the sample
    return sample(layer.weight if layer.exact_base is None else layer.exact_base, samples)


def compare_fingerprints(saved: str, current: str) -> Optional[str]:
    """None when the base fingerprinted as ``saved`` is the one fingerprinted as ``current`` (possibly cast to another
    floating dtype); otherwise why not, in words (another model, or other values and which dtypes were involved)."""
    old, new = _parse(saved), _parse(current)
    if (old is None and saved.startswith("{")) or (new is None and current.startswith("{")):
        return "its base fingerprint is in a format this version of lightning_lora cannot read (damaged, or newer)"
    if old is None or new is None:  # a fingerprint from before version 2: an exact hash
        before = saved if old is None else old["legacy"]
        now = current if new is None else new["legacy"]
        return None if before == now else f"the base weights differ (fingerprint {before}, this model {now})"
    if old["structure"] != new["structure"] or len(old["tensors"]) != len(new["tensors"]):
        return "it was saved from another model (the base's parameter names or shapes differ from this model's)"
    pairs = [(_decode(a), _decode(b)) for a, b in zip(old["tensors"], new["tensors"])]
    differ = sum(not _close(a, b) for a, b in pairs)
    if not differ:
        return None
    was, now = _main_dtype(a for a, _ in pairs), _main_dtype(b for _, b in pairs)
    if was != now:
        return (f"the adapter was saved over a {was} base and this base is {now}, and {differ} of {len(pairs)} sampled "
                "tensors differ by more than a cast between the two rounds: it looks like another base. If it is the "
                "same base (a float16 cast can also overflow), pass check_base=False")
    return (f"same parameter names, shapes and dtype ({now}), but {differ} of {len(pairs)} sampled tensors hold other "
            "values: another base model, or a changed one")


def _parse(fingerprint: str) -> Optional[dict]:
    try:
        data = json.loads(fingerprint) if fingerprint.startswith("{") else None
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("version") == VERSION else None


def _decode(entry: str) -> Tensor:
    dtype_name, _, raw = entry.partition(":")
    data = bytearray(base64.b64decode(raw))
    return torch.frombuffer(data, dtype=torch.uint8).view(getattr(torch, dtype_name)) if data else torch.empty(0)


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal in the same dtype; within one unit in the last place of the coarser dtype across a cast."""
    if a.dtype == b.dtype or a.numel() != b.numel():
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bitwise: NaN == NaN
    a64, b64 = a.double(), b.double()
    bits = min(MANTISSA_BITS.get(a.dtype, 52), MANTISSA_BITS.get(b.dtype, 52))
    _, exponent = torch.frexp(torch.maximum(a64.abs(), b64.abs()))
    tolerance = torch.ldexp(torch.ones_like(a64), exponent - 1 - bits)
    if torch.float16 in (a.dtype, b.dtype):
        tolerance = tolerance.clamp_min(FLOAT16_SUBNORMAL)
    return bool(((a64 - b64).abs() <= tolerance).all())


def _main_dtype(samples) -> str:
    counts = collections.Counter(str(s.dtype).removeprefix("torch.") for s in samples)
    return counts.most_common(1)[0][0] if counts else "empty"
