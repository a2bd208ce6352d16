#!/usr/bin/env python
"""CPU probe: does a small change of DoRA's magnitude reach a bf16 layer's output? (RESULTS.md, run 3, finding 4)

One DoRA layer (library defaults: fp32 adapters over a bf16 2048x2048 base), B random with the given std, m set to
||W|| (scale = 1), then m scaled by 1 + eps. It prints the share of the intended change eps * base that reaches the
output in expectation, sum((out(eps) - out(0)) * base) / (eps * sum(base^2)), for three orders of the same sum:
the library's forward, the two small terms summed first in bf16, and PEFT's way (the whole DoRA term in fp32, one
rounding). 1 = transmitted (dithered by the LoRA term across bf16's spacing), 0 = rounded away.

    python benchmarks/probe_dora_rounding.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lightning_lora as ll  # noqa: E402

BF16 = torch.bfloat16


def parts(layer, x):
    base = F.linear(x, layer.weight)
    dora = layer.adapters["default"]
    scale = dora.lora_magnitude_vector.float() / dora.column_norm(layer.weight)
    lora = F.linear(F.linear(x, dora.lora_A.weight.to(BF16)), dora.lora_B.weight.to(BF16)) * dora.scaling
    return base, scale, lora


IMPLS = {
    "library forward": lambda layer, x: layer(x),
    "small terms first (bf16)": lambda layer, x: (
        lambda b, s, lo: b + ((s - 1).to(BF16) * b + s.to(BF16) * lo))(*parts(layer, x)),
    "PEFT-like (fp32 term)": lambda layer, x: (
        lambda b, s, lo: (b.float() + (s - 1) * b.float() + s * lo.float()).to(BF16))(*parts(layer, x)),
}


def main() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(2048, 2048, bias=False, dtype=BF16)
    nn.init.normal_(lin.weight, std=0.02)
    model = nn.Sequential(lin)
    ll.inject(model, ll.AdapterConfig.create("dora", r=16, alpha=32, target_modules=["0"]))
    layer, dora = model[0], model[0].adapters["default"]
    x = torch.randn(1024, 2048, dtype=BF16)
    with torch.no_grad():
        for b_std in (0.0, 1e-4, 1e-3):
            dora.lora_B.weight.normal_(std=b_std) if b_std else dora.lora_B.weight.zero_()
            dora.lora_magnitude_vector.copy_(dora.column_norm(layer.weight))
            m0 = dora.lora_magnitude_vector.clone()
            base = F.linear(x, layer.weight).float()
            for eps in (2e-4, 1e-3, 4e-3):
                row = []
                for name, f in IMPLS.items():
                    dora.lora_magnitude_vector.copy_(m0)
                    out0 = f(layer, x).float()
                    dora.lora_magnitude_vector.copy_(m0 * (1 + eps))
                    out1 = f(layer, x).float()
                    share = ((out1 - out0) * base).sum() / (eps * (base * base).sum())
                    row.append(f"{name} {share:.2f}")
                print(f"B std {b_std:<6g} m *= 1 + {eps:<6g} share reaching the output: " + ", ".join(row))
            dora.lora_magnitude_vector.copy_(m0)


if __name__ == "__main__":
    main()
