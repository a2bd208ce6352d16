"""Hot-swap: another adapter's weights into a loaded one, in place, without recompiling a compiled model."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_llama

from lightning_lora import ConfigError, inject, load_adapter, merge, save_adapter
from lightning_lora.hotswap import hotswap_adapter


def saved(tmp_path, name: str, seed: int, base_seed: int = 0, **options) -> str:
    model = make_llama(base_seed)
    inject(model, dict(dict(method="lora", target_modules=["q_proj", "v_proj"], init_weights=False), **options),
           seed=seed)
    save_adapter(model, tmp_path / name)
    return str(tmp_path / name)


def test_hotswap_under_compile_does_not_recompile(tmp_path) -> None:
    first = saved(tmp_path, "first", 1, r=8, alpha=16)
    smaller = saved(tmp_path, "smaller", 2, r=4, alpha=3, target_modules=["v_proj"])  # lower rank, other scaling
    same = saved(tmp_path, "same", 3, r=8, alpha=8)
    model = make_llama(0)
    load_adapter(model, first)
    tokens = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(tokens)
        frames = counter.frame_count
        for source in (smaller, same, first):
            hotswap_adapter(model, source)
            reference = make_llama(0)
            load_adapter(reference, source)
            torch.testing.assert_close(compiled(tokens).logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == frames  # not one recompilation
    torch._dynamo.reset()


def test_hotswap_from_a_loaded_adapter_and_bad_swaps(tmp_path) -> None:
    model = make_llama(0)
    load_adapter(model, saved(tmp_path, "first", 1, r=4))
    inject(model, dict(method="lora", r=2, target_modules=["q_proj"], init_weights=False), seed=5, name="other")
    layer = model.model.layers[0].self_attn.q_proj
    hotswap_adapter(model, "other")
    torch.testing.assert_close(layer.delta_weight("default"), layer.delta_weight("other"), rtol=1e-6, atol=1e-7)
    assert not model.model.layers[0].self_attn.v_proj.adapters["default"].lora_B.weight.any()  # not in "other"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [
        (saved(tmp_path, "bigger", 2, r=8), ConfigError, "cannot grow it"),
        (saved(tmp_path, "wider", 3, r=2, target_modules=["q_proj", "o_proj"]), ConfigError, "cannot add layers"),
        (saved(tmp_path, "dora", 4, method="dora", r=2), ConfigError, "only LoRA"),
        ("nope", Exception, "does not exist"),
        (saved(tmp_path, "other_base", 5, base_seed=7, r=2), Exception, "different base model"),
    ]
    for source, error, message in bad:
        with pytest.raises(error, match=message):
            hotswap_adapter(model, source)
    with pytest.raises(ConfigError, match="no adapter named 'x'"):
        hotswap_adapter(model, "other", name="x")
    merge(model)
    with pytest.raises(ConfigError, match="unmerge"):
        hotswap_adapter(model, "other")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items() if "adapters" in k)
