"""Target specs -> module paths: PEFT's matching rules, checked against PEFT itself on the same models."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
from conftest import make_bert, make_gpt2, make_llama, make_plain
from tiny_modules import AttentionNet
from peft_oracle import PEFT_WARNINGS, peft_adapted_paths, peft_inner, peft_model
import torch
from torch import nn

from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.methods.base import LINEAR_TYPES
from lightning_lora.methods.lora import supports_lora
from lightning_lora.surgery import adapters, inject
from lightning_lora.targeting import layer_index, output_head_names, pattern_value, resolve_targets

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]

# (id, model factory, our options, extra PEFT options); PEFT gets the same target/exclude/layer options.
SPECS: list[tuple[str, Callable[[], nn.Module], dict[str, Any], dict[str, Any]]] = [
    ("names", make_llama, {"target_modules": ["q_proj", "v_proj"]}, {}),
    ("dotted-suffix", make_llama, {"target_modules": ["self_attn.o_proj", "mlp.up_proj"]}, {}),
    ("full-path", make_llama, {"target_modules": ["model.layers.1.mlp.down_proj"]}, {}),
    ("regex", make_llama, {"target_modules": r".*\.layers\.1\..*_proj"}, {}),
    ("regex-alternation", make_llama, {"target_modules": r".*(q|k)_proj"}, {}),
    ("regex-is-fullmatch", make_llama, {"target_modules": r"model\.layers\.0\.self_attn\.(q|k)_proj"}, {}),
    ("all-linear-llama", make_llama, {"target_modules": "all-linear"}, {}),
    ("all-linear-tied", lambda: make_llama(tie=True), {"target_modules": "all-linear"}, {}),
    ("all-linear-gpt2", make_gpt2, {"target_modules": "all-linear"}, {}),
    ("all-linear-bert", make_bert, {"target_modules": "all-linear"}, {"task_type": "SEQ_CLS"}),
    ("all-linear-plain", make_plain, {"target_modules": "all-linear"}, {}),
    ("gpt2-names", make_gpt2, {"target_modules": ["c_attn", "c_proj"]}, {}),
    ("bert-names", make_bert, {"target_modules": ["query", "value", "dense"]}, {}),
    ("plain-mixed-types", make_plain, {"target_modules": ["embed", "conv", "block.0", "head"]}, {}),
    ("plain-regex", make_plain, {"target_modules": r"block\.[02]|h.*"}, {}),
    ("exclude-path", make_llama,
     {"target_modules": ["q_proj", "k_proj", "v_proj"], "exclude_modules": ["model.layers.0.self_attn.k_proj"]}, {}),
    ("exclude-name", make_llama, {"target_modules": "all-linear", "exclude_modules": ["down_proj", "q_proj"]}, {}),
    ("exclude-regex", make_llama, {"target_modules": "all-linear", "exclude_modules": r".*\.mlp\..*"}, {}),
    ("layers-list", make_llama, {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]}, {}),
    ("layers-int", make_llama, {"target_modules": ["v_proj"], "layers_to_transform": 0}, {}),
    ("layers-pattern", make_llama,
     {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}, {}),
    ("layers-pattern-gpt2", make_gpt2,
     {"target_modules": ["c_attn"], "layers_to_transform": [0], "layers_pattern": "h"}, {}),
    ("layers-and-exclude", make_llama,
     {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1],
      "exclude_modules": ["model.layers.1.self_attn.v_proj"]}, {}),
]


def _ours(model: nn.Module, **options: Any) -> list[str]:
    return inject(copy.deepcopy(model), AdapterConfig.create("lora", r=2, **options))


@pytest.mark.parametrize("make,options,extra", [s[1:] for s in SPECS], ids=[s[0] for s in SPECS])
def test_picks_exactly_the_modules_peft_picks(make: Callable[[], nn.Module], options: dict[str, Any],
                                              extra: dict[str, Any]) -> None:
    model = make()
    ours = _ours(model, **options)
    theirs = peft_adapted_paths(peft_model(model, r=2, **options, **extra))  # the option names are PEFT's too
    assert ours, "the spec should match something"
    assert ours == theirs


def test_names_match_whole_segments_only() -> None:
    """'proj' is not a suffix match for 'q_proj' (only '.proj' would be), as in PEFT."""
    with pytest.raises(ConfigError, match="matched no module"):
        _ours(make_llama(), target_modules=["proj"])


def test_regex_must_match_the_whole_path() -> None:
    """``q_proj`` as a regex string matches no full path (it is not a search)."""
    with pytest.raises(ConfigError, match="matched no module"):
        _ours(make_llama(), target_modules="q_proj")


def test_all_linear_leaves_the_output_head_alone() -> None:
    for make, head in ((make_llama, "lm_head"), (make_gpt2, "lm_head"), (make_bert, "classifier")):
        model = make()
        assert head in output_head_names(model)
        chosen = resolve_targets(model, AdapterConfig.create("lora"), supports_lora, LINEAR_TYPES)
        assert head not in chosen and chosen


def test_all_linear_skips_non_linear_layers_without_complaint() -> None:
    chosen = _ours(make_plain(), target_modules="all-linear")
    assert chosen == ["block.0", "block.2", "head"]  # the embedding and the convolution are not linear


def test_rank_and_alpha_patterns_match_peft() -> None:
    """Per-module r/alpha (plain names and regexes, first match wins) and the resulting scaling agree with PEFT."""
    model = make_llama()
    options = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4,
               "rank_pattern": {r"layers\.1\.self_attn\.v_proj": 6, "q_proj": 2},
               "alpha_pattern": {"v_proj": 3.0, r"model\.layers\.0\.mlp\.down_proj": 20.0}}
    ours = copy.deepcopy(model)
    inject(ours, AdapterConfig.create("lora", alpha=8.0, **options))
    theirs = peft_inner(peft_model(model, lora_alpha=8.0, **options))
    found = {path: layer.adapters["default"] for path, layer in adapters(ours).items()}
    assert len(found) == 6
    for path, adapter in found.items():
        layer = theirs.get_submodule(path)
        assert (adapter.r, adapter.alpha) == (layer.r["default"], layer.lora_alpha["default"]), path
        assert adapter.scaling == pytest.approx(layer.scaling["default"]), path
    assert found["model.layers.1.self_attn.v_proj"].r == 6 and found["model.layers.0.self_attn.v_proj"].r == 4
    assert found["model.layers.0.self_attn.q_proj"].r == 2
    assert found["model.layers.0.mlp.down_proj"].alpha == 20.0 and found["model.layers.1.mlp.down_proj"].alpha == 8.0


def test_rslora_scaling_per_module() -> None:
    model = make_llama()
    ours = copy.deepcopy(model)
    options = {"target_modules": ["q_proj"], "r": 4, "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 16}}
    inject(ours, AdapterConfig.create("lora", alpha=8.0, use_rslora=True, **options))
    theirs = peft_inner(peft_model(model, lora_alpha=8.0, use_rslora=True, **options))
    for path, adapter in ((p, a.adapters["default"]) for p, a in adapters(ours).items()):
        assert adapter.scaling == pytest.approx(8.0 / adapter.r ** 0.5)
        assert adapter.scaling == pytest.approx(theirs.get_submodule(path).scaling["default"])


def test_pattern_value_matches_at_a_dot_boundary_first_key_wins() -> None:
    assert pattern_value({"proj": 2}, "model.q_proj", 8) == 8
    assert pattern_value({"q_proj": 2}, "model.q_proj", 8) == 2
    assert pattern_value({"q_proj": 2, "model.q_proj": 3}, "model.q_proj", 8) == 2
    assert pattern_value({r"layers\.\d\.q_proj": 5}, "m.layers.3.q_proj", 8) == 5
    assert pattern_value({}, "anything", 7) == 7


@pytest.mark.parametrize("path,pattern,expected", [
    ("model.layers.3.mlp.down_proj", None, 3),
    ("model.layers.3.mlp.experts.7.w1", None, 3),  # the first number after a dotted name: the layer
    ("layers.0.mlp.experts.2.w1", None, 2),  # at the top level that is the expert (PEFT's rule; see MOE_SPECS)
    ("layers.2.attn", None, None),
    ("model.layers.3.mlp.experts.7.w1", "experts", 7),
    ("layers.2.attn", "layers", 2),
    ("transformer.h.1.attn.c_attn", ["blocks", "h"], 1),
    ("lm_head", None, None),
    ("model.layers.3.mlp", "blocks", None),
])
def test_layer_index(path: str, pattern: Any, expected: Any) -> None:
    assert layer_index(path, pattern) == expected


# -- errors --------------------------------------------------------------------------------------------------------
def test_misspelled_target_names_the_closest_modules() -> None:
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        inject(model, AdapterConfig.create("lora", target_modules=["q_prj"]))
    message = str(info.value)
    assert "q_prj" in message and "Closest module names: q_proj" in message
    assert not adapters(model) and model.state_dict().keys() == before.keys()


def test_regex_that_matches_nothing_names_the_closest_modules() -> None:
    with pytest.raises(ConfigError, match=r"matched no module.*Closest module names:.*c_attn"):
        _ours(make_gpt2(), target_modules=r".*\.c_atn")


def test_filters_that_remove_everything_are_named_in_the_error() -> None:
    with pytest.raises(ConfigError, match=r"after exclude_modules=\['q_proj'\]"):
        _ours(make_llama(), target_modules=["q_proj"], exclude_modules=["q_proj"])
    with pytest.raises(ConfigError, match=r"layers_to_transform=\[5\]"):
        _ours(make_llama(), target_modules=["q_proj"], layers_to_transform=[5])


def test_targeting_a_module_the_method_cannot_adapt_names_its_type() -> None:
    with pytest.raises(ConfigError, match=r"cannot adapt: model\.layers\.0\.mlp\.act_fn \(SiLUActivation\)"):
        _ours(make_llama(), target_modules=["act_fn"], layers_to_transform=[0])
    with pytest.raises(ConfigError, match=r"'adalora' cannot adapt: embed \(Embedding\)"):
        inject(make_plain(), AdapterConfig.create("adalora", init_r=2, target_r=1, target_modules=["embed", "head"]))


# -- nested (MoE-style) names: which index is the layer, with PEFT as the oracle ----------------------------------
class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(4, 4)


class MoEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Module()
        self.mlp.experts = nn.ModuleList([Expert() for _ in range(3)])


class MoEStack(nn.Module):
    """``layers.N.mlp.experts.M.w1`` twice: under ``model.`` and at the top level, where PEFT's rule (the first
    number after a dotted name) reads the expert index as the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([MoEBlock() for _ in range(3)])
        self.layers = nn.ModuleList([MoEBlock() for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.model.layers, *self.layers]:
            x = block.attn(x) + sum(e.w1(x) for e in block.mlp.experts)
        return x


def _peft_paths(model: nn.Module, **options: Any) -> list[str]:
    import peft
    from peft.tuners.lora import LoraLayer

    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, **options), copy.deepcopy(model))
    return [p for p, m in theirs.named_modules() if isinstance(m, LoraLayer)]


MOE_SPECS = {
    "experts-no-pattern": {"target_modules": ["w1"], "layers_to_transform": [2]},
    "experts-no-pattern-int": {"target_modules": ["w1"], "layers_to_transform": 0},
    "attn-no-pattern": {"target_modules": ["attn"], "layers_to_transform": [1, 2]},
    "experts-pattern": {"target_modules": ["w1"], "layers_to_transform": [1], "layers_pattern": "experts"},
    "layers-pattern": {"target_modules": ["w1", "attn"], "layers_to_transform": [0], "layers_pattern": "layers"},
    "full-path-bypasses-layers": {"target_modules": ["model.layers.1.attn", "w1"], "layers_to_transform": [0]},
    "tail-matches-both": {"target_modules": ["layers.1.attn"]},
}


@pytest.mark.parametrize("options", MOE_SPECS.values(), ids=MOE_SPECS.keys())
def test_nested_layer_indexes_follow_peft(options: dict[str, Any]) -> None:
    """PEFT 0.21's rule, which we follow: without layers_pattern the layer is the first number that follows a
    dotted name (``model.layers.3.mlp.experts.7.w1`` -> 3, but a top-level ``layers.0.mlp.experts.2.w1`` -> 2, the
    expert), and a target listed as a full path is kept whatever its layer."""
    model = MoEStack()
    ours = inject(copy.deepcopy(model), AdapterConfig.create("lora", r=2, **options))
    assert ours == _peft_paths(model, **options)


def test_export_names_exactly_the_trained_modules_for_peft(tmp_path: Any) -> None:
    """``layers.1.attn`` is also the tail of ``model.layers.1.attn``: the export must still make PEFT adapt (and
    rank) exactly what we trained, whatever rule picked it."""
    import peft
    from peft.tuners.lora import LoraLayer

    from lightning_lora.io import load_adapter, save_adapter

    model = MoEStack()
    ours = copy.deepcopy(model)
    chosen = inject(ours, AdapterConfig.create("lora", r=2, target_modules=r"(model\.)?layers\.1\.attn|layers\.0\.attn",
                                               rank_pattern={r"^layers\.1\.attn": 3}, init_weights=False))
    assert chosen == ["model.layers.1.attn", "layers.0.attn", "layers.1.attn"]
    save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"))
    inner = theirs.base_model.model
    assert [p for p, m in inner.named_modules() if isinstance(m, LoraLayer)] == chosen
    ranks = {p: (a.adapters["default"] if hasattr(a, "adapters") else a).r for p, a in adapters(ours).items()}
    assert {p: inner.get_submodule(p).r["default"] for p in chosen} == ranks
    x = torch.randn(2, 4)
    assert torch.allclose(theirs(x), ours(x), atol=1e-6)
    again = copy.deepcopy(model)
    assert load_adapter(again, tmp_path / "a") == chosen and torch.allclose(again(x), ours(x), atol=1e-6)



def test_all_linear_skips_multihead_attention_out_proj() -> None:
    """The owner passes out_proj.weight to F.multi_head_attention_forward and never calls out_proj's forward, so an
    adapter there would never train; all-linear leaves it out."""
    model = AttentionNet()
    assert inject(model, AdapterConfig.create("lora", r=2, target_modules="all-linear")) == ["ffn"]


def test_naming_multihead_attention_out_proj_is_refused() -> None:
    model = AttentionNet()
    with pytest.raises(ConfigError, match=r"attn\.out_proj: the out_proj of an nn\.MultiheadAttention.*never train"):
        inject(model, AdapterConfig.create("lora", r=2, target_modules=["out_proj", "ffn"]))
    assert not adapters(model)


def test_all_linear_on_nothing_but_multihead_attention_is_an_error() -> None:
    """Skipping out_proj must not leave all-linear adapting nothing without a word."""
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    with pytest.raises(ConfigError, match="out_proj of an nn.MultiheadAttention"):
        inject(model, AdapterConfig.create("lora", r=2, target_modules="all-linear"))
    assert not adapters(model)
