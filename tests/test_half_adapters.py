"""Every method trains with its adapter itself in bfloat16, as DeepSpeed's bf16 mode leaves it (it casts the whole
module, adapters included; Lightning's bf16-mixed keeps them float32). Linear algebra with no half-precision kernels
(OFT/BOFT's Cayley solve, HRA's QR and triangular solve) must run in float32 inside: on 2 H200s under ZeRO-3
bf16-mixed they failed with "lu_factor_cublas" / "triangular_solve_cuda" not implemented for 'BFloat16'; the CPU's
kernels lack them too, so this test sees the same failure."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_llama
from ddp_train import WEIGHT_UPDATES

from lightning_lora.config import AdapterConfig
from lightning_lora.surgery import adapter_parameters, inject

INSERTED = {"houlsby": {"reduction_factor": 8}, "pfeiffer": {"reduction_factor": 8}, "llama_adapter": {"adapter_len": 4},
            "prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4}}
CASES = {**{name: [options] for name, options in WEIGHT_UPDATES.items()},
         "hra_gram_schmidt": [{**WEIGHT_UPDATES["hra"], "apply_GS": True}],
         "oft_cayley_neumann": [{**WEIGHT_UPDATES["oft"], "use_cayley_neumann": True}],
         **{name: [{"method": name, **options}] for name, options in INSERTED.items()}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trains_with_bf16_adapter_weights(case: str) -> None:
    model = make_llama()
    for options in CASES[case]:
        inject(model, AdapterConfig.from_dict(options), seed=0)
    model.bfloat16().train()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    params = list(adapter_parameters(model))
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
