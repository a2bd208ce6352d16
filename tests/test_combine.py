"""Weighted combinations of adapters (``combine.add_weighted_adapter``) against PEFT's ``add_weighted_adapter``."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from peft_oracle import PEFT_WARNINGS, logits

from lightning_lora import (
    ConfigError,
    adapter_names,
    adapters,
    add_weighted_adapter,
    inject,
    load_adapter,
    merge,
    save_adapter,
    set_active_adapters,
    unmerge,
)

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]
pytestmark.append(pytest.mark.filterwarnings("ignore:The density .* no pruning:UserWarning"))

TYPES = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_ties_svd"]


def peft_pair(tmp_path, ranks=(4, 4)):
    """A PEFT model with LoRA adapters "default" and "b" (random factors, one layer targeted by "b" only), and our
    model loaded from PEFT's save of it."""
    import peft

    torch.manual_seed(0)
    base = make_llama(0)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=ranks[0], lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    theirs.add_adapter("b", peft.LoraConfig(r=ranks[1], lora_alpha=3, target_modules=["v_proj", "o_proj"],
                                            init_lora_weights=False))
    theirs.eval().save_pretrained(str(tmp_path / "peft"))
    ours = make_llama(0)
    load_adapter(ours, tmp_path / "peft")
    return theirs, ours


def peft_factors(theirs, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    return {path: (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach())
            for path, m in theirs.base_model.model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def our_factors(ours, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {path: (layer.adapters[name].lora_A.weight.detach(), layer.adapters[name].lora_B.weight.detach())
            for path, layer in adapters(ours).items() if name in layer.adapters}


@pytest.mark.parametrize("ranks", [(4, 4), (4, 2)])
def test_weighted_adapter_matches_peft(tmp_path, monkeypatch, tokens: torch.Tensor, ranks: tuple[int, int]) -> None:
    theirs, ours = peft_pair(tmp_path, ranks)
    # PEFT draws DARE's masks from the global stream after initializing the new adapter: reseed it there, so that
    # both draw from the same stream (ours draws from seed in a forked RNG)
    import peft.tuners.lora.model as peft_lora

    freeze = peft_lora._freeze_adapter
    monkeypatch.setattr(peft_lora, "_freeze_adapter", lambda *a: (freeze(*a), torch.manual_seed(7)))
    types = TYPES if ranks[0] == ranks[1] else [t for t in TYPES if t == "cat" or t.endswith("svd")]
    for combination in types:
        options = dict(combination_type=combination, density=0.5, svd_rank=3)
        theirs.add_weighted_adapter(["default", "b"], [0.7, -0.4], combination, **options)
        add_weighted_adapter(ours, ["default", "b"], [0.7, -0.4], combination, seed=7, **options)
        expected, got = peft_factors(theirs, combination), our_factors(ours, combination)
        assert sorted(expected) == sorted(got)
        for path, (a, b) in expected.items():
            # factors of an SVD are unique up to sign; PEFT pads every layer's cat to the sum of all ranks, we to
            # the sum of the ranks on that layer: compare the updates
            if combination.endswith("svd") or combination == "cat":
                torch.testing.assert_close(got[path][1] @ got[path][0], b @ a, rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(got[path][0], a, rtol=1e-6, atol=1e-7, msg=combination)
                torch.testing.assert_close(got[path][1], b, rtol=1e-6, atol=1e-7, msg=combination)
        theirs.set_adapter(combination)
        set_active_adapters(ours, combination)
        with torch.no_grad():
            torch.testing.assert_close(logits(ours, tokens), logits(theirs, tokens), rtol=1e-5, atol=1e-5)


def test_cat_is_the_exact_weighted_sum_and_exports_and_merges(tmp_path, tokens: torch.Tensor) -> None:
    _, ours = peft_pair(tmp_path, ranks=(4, 2))
    add_weighted_adapter(ours, ["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    layer = ours.model.layers[0].self_attn.v_proj
    expected = 0.5 * layer.delta_weight("default") + 2.0 * layer.delta_weight("b")
    torch.testing.assert_close(layer.delta_weight("mix"), expected, rtol=1e-5, atol=1e-6)
    # rank: the sum of the ranks on each layer (v_proj has both adapters, q_proj only the rank-4 one)
    assert layer.adapters["mix"].r == 6 and ours.model.layers[0].self_attn.q_proj.adapters["mix"].r == 4
    set_active_adapters(ours, "mix")
    with torch.no_grad():
        before = logits(ours, tokens)
        merge(ours)
        torch.testing.assert_close(logits(ours, tokens), before, rtol=1e-5, atol=1e-5)
        unmerge(ours)
    save_adapter(ours, tmp_path / "saved", names=["mix"])
    again = make_llama(0)
    load_adapter(again, tmp_path / "saved")
    assert adapter_names(again) == ["mix"]
    with torch.no_grad():
        torch.testing.assert_close(logits(again, tokens), before, rtol=1e-6, atol=1e-6)


def test_dare_is_seedable() -> None:
    model = make_llama(0)
    for name, seed in (("a", 1), ("b", 2)):
        inject(model, dict(method="lora", r=2, target_modules=["q_proj"], init_weights=False), seed=seed, name=name)
    for name, seed in (("x", 5), ("y", 5), ("z", 6)):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], name, combination_type="dare_linear", density=0.5, seed=seed)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.delta_weight("x"), layer.delta_weight("y"))
    assert not torch.equal(layer.delta_weight("x"), layer.delta_weight("z"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(names=["a", "nope"], weights=[1, 1]), "no adapter named 'nope'"),
    (dict(names=["a", "b"], weights=[1.0]), "weights has 1 values for 2 adapters"),
    (dict(names=["a", "b"], weights=[1, 1], combination_type="ties", density=0.0), r"density in \(0, 1\]"),
    (dict(names=["a", "b"], weights=[1, 1], combination_type="ties", density=1.5), r"density in \(0, 1\]"),
    (dict(names=["a", "b"], weights=[1, 1], combination_type="dare_ties"), r"needs density"),
    (dict(names=["a", "c"], weights=[1, 1], combination_type="linear"), "one rank"),
    (dict(names=["a", "d"], weights=[1, 1], combination_type="svd"), "plain LoRA"),
    (dict(names=["a", "b"], weights=[1, 1], combination_type="mean"), "unknown"),
    (dict(names=["a", "b"], weights=[1, float("nan")]), "finite"),
    (dict(names=["a", "b"], weights=[1, 1], name="a"), "already has"),
])
def test_bad_combinations_are_refused_and_change_nothing(kwargs: dict, message: str) -> None:
    model = make_llama(0)
    for name, options in (("a", dict(r=2)), ("b", dict(r=2)), ("c", dict(r=3)), ("d", dict(method="dora", r=2))):
        inject(model, dict(dict(method="lora", target_modules=["q_proj"]), **options), seed=1, name=name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(dict(name="mix"), **kwargs)
    with pytest.raises(ConfigError, match=message):
        add_weighted_adapter(model, **kwargs)
    assert adapter_names(model) == ["a", "b", "c", "d"]
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
