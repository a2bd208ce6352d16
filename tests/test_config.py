"""AdapterConfig: construction, validation, our JSON round trip and PEFT's adapter_config.json vocabulary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from peft_oracle import PEFT_WARNINGS

from lightning_lora.config import AdapterConfig, BottleneckConfig, ConfigError, LoRAConfig, config_class_for


pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]


def test_lora_defaults_follow_peft_and_qlora() -> None:
    """No targets means every linear layer but the head; alpha 16 / r 8; B starts at zero."""
    config = AdapterConfig.create()
    assert isinstance(config, LoRAConfig)
    assert (config.method, config.r, config.alpha, config.dropout) == ("lora", 8, 16.0, 0.0)
    assert config.target_modules == "all-linear"
    assert config.init_weights is True and not config.use_dora and not config.use_rslora
    assert config.scaling(8, 16.0) == 2.0


def test_create_picks_the_config_class_per_method() -> None:
    assert AdapterConfig.create("dora", r=4).use_dora
    assert type(AdapterConfig.create("dora")) is LoRAConfig
    houlsby = AdapterConfig.create("houlsby", reduction_factor=8, nonlinearity="gelu")
    assert isinstance(houlsby, BottleneckConfig)
    assert (houlsby.method, houlsby.reduction_factor, houlsby.nonlinearity) == ("houlsby", 8, "gelu")
    assert houlsby.target_modules is None  # bottleneck adapters locate sublayers themselves
    assert config_class_for("pfeiffer") is BottleneckConfig


def test_rslora_scaling() -> None:
    config = AdapterConfig.create("lora", use_rslora=True)
    assert config.scaling(16, 8.0) == pytest.approx(8.0 / 4.0)
    assert AdapterConfig.create("lora").scaling(16, 8.0) == pytest.approx(0.5)


def test_normalizes_target_containers_and_layer_index() -> None:
    config = AdapterConfig.create("lora", target_modules=("v_proj", "q_proj"), exclude_modules={"k", "a"},
                                  layers_to_transform=3)
    assert config.target_modules == ["v_proj", "q_proj"]
    assert config.exclude_modules == ["a", "k"]
    assert config.layers_to_transform == [3]


ROUND_TRIP_CASES: list[dict[str, Any]] = [
    {"method": "lora"},
    {"method": "lora", "target_modules": ["q_proj", "v_proj"], "r": 4, "alpha": 8.0, "dropout": 0.1,
     "use_rslora": True, "init_weights": "gaussian", "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3.0},
     "exclude_modules": ["model.layers.0.self_attn.q_proj"], "layers_to_transform": [0, 1], "layers_pattern": "layers"},
    {"method": "dora", "target_modules": r".*\.(q|v)_proj", "r": 2, "init_weights": False},
    {"method": "houlsby"},
    {"method": "pfeiffer", "target_modules": ["block.2"], "reduction_factor": 4, "nonlinearity": "tanh"},
]


@pytest.mark.parametrize("options", ROUND_TRIP_CASES, ids=lambda o: o["method"] + str(len(o)))
def test_to_dict_from_dict_round_trip_through_json(options: dict[str, Any]) -> None:
    options = dict(options)
    config = AdapterConfig.create(options.pop("method"), **options)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == config.method
    again = AdapterConfig.from_dict(data)
    assert type(again) is type(config)
    assert again == config
    assert again.to_dict() == config.to_dict()


def _peft_json(tmp_path: Path, **options: Any) -> dict[str, Any]:
    """The adapter_config.json PEFT itself writes for ``LoraConfig(**options)``."""
    import peft

    peft.LoraConfig(**options).save_pretrained(str(tmp_path))
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_reads_peft_adapter_config_json(tmp_path: Path) -> None:
    data = _peft_json(tmp_path, r=4, lora_alpha=12, lora_dropout=0.05, target_modules=["v_proj", "q_proj"],
                      exclude_modules=["k_proj"], layers_to_transform=[1], layers_pattern="layers", use_rslora=True,
                      rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}, init_lora_weights="gaussian")
    config = AdapterConfig.from_dict(data)
    assert isinstance(config, LoRAConfig)
    assert config.method == "lora"
    assert (config.r, config.alpha, config.dropout, config.use_rslora) == (4, 12, 0.05, True)
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert config.exclude_modules == ["k_proj"]
    assert (config.layers_to_transform, config.layers_pattern) == ([1], "layers")
    assert config.rank_pattern == {"q_proj": 2} and config.alpha_pattern == {"v_proj": 3}
    assert config.init_weights == "gaussian"


def test_peft_use_dora_maps_to_method_dora(tmp_path: Path) -> None:
    config = AdapterConfig.from_dict(_peft_json(tmp_path, r=2, target_modules=["q_proj"], use_dora=True))
    assert config.method == "dora" and config.use_dora and config.r == 2


def test_peft_regex_target_stays_a_regex(tmp_path: Path) -> None:
    config = AdapterConfig.from_dict(_peft_json(tmp_path, target_modules=r".*\.q_proj"))
    assert config.target_modules == r".*\.q_proj"


def test_our_peft_dict_is_read_by_peft_and_by_us(tmp_path: Path) -> None:
    """to_peft_dict writes resolved paths and per-module ranks; PEFT parses it and we read it back unchanged."""
    import peft

    config = AdapterConfig.create("dora", r=4, alpha=8.0, dropout=0.1, use_rslora=True, target_modules=["q_proj"])
    targets = ["m.layers.1.q_proj", "m.layers.0.q_proj"]
    data = config.to_peft_dict(targets, ranks={targets[0]: 4, targets[1]: 2}, alphas={t: 8.0 for t in targets},
                               fan_in_fan_out=False, base_model_name_or_path=None, task_type="CAUSAL_LM")
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert theirs.use_dora and theirs.use_rslora and theirs.r == 4 and theirs.lora_alpha == 8.0
    assert set(theirs.target_modules) == set(targets)
    assert theirs.rank_pattern == {"m.layers.0.q_proj": 2} and theirs.alpha_pattern == {}
    ours = AdapterConfig.from_dict(data)
    assert ours.method == "dora" and ours.target_modules == sorted(targets)
    assert ours.rank_pattern == {"m.layers.0.q_proj": 2}
    assert (ours.r, ours.alpha, ours.dropout, ours.use_rslora) == (4, 8.0, 0.1, True)


# -- errors --------------------------------------------------------------------------------------------------------
def test_unknown_method_lists_known_and_closest() -> None:
    with pytest.raises(ConfigError) as info:
        AdapterConfig.create("lorra")
    message = str(info.value)
    assert "'lorra'" in message and "Did you mean 'lora'" in message
    for known in ("lora", "dora", "houlsby", "pfeiffer"):
        assert known in message
    with pytest.raises(ConfigError, match="Unknown method 'nope'"):
        AdapterConfig.from_dict({"method": "nope"})


def test_option_of_another_method_is_rejected() -> None:
    with pytest.raises(ConfigError, match="'lora' takes no option 'reduction_factor'") as info:
        AdapterConfig.create("lora", reduction_factor=4)
    assert "alpha" in str(info.value) and "rank_pattern" in str(info.value)  # lists the options it does take
    with pytest.raises(ConfigError, match="'houlsby' takes no option 'r'"):
        AdapterConfig.create("houlsby", r=4)


def test_misspelled_option_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'alpha'"):
        AdapterConfig.create("lora", alpah=4)


def test_from_dict_rejects_unknown_fields_and_untagged_dicts() -> None:
    with pytest.raises(ConfigError, match=r"unknown fields \['rank'\]"):
        AdapterConfig.from_dict({"method": "lora", "rank": 4})
    with pytest.raises(ConfigError, match="neither 'method'.*nor 'peft_type'"):
        AdapterConfig.from_dict({"r": 4})


@pytest.mark.parametrize("options", [
    {"r": 0}, {"r": -2}, {"r": 2.5}, {"r": True}, {"rank_pattern": {"q_proj": 0}},
])
def test_rank_must_be_a_positive_integer(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="must be a positive integer"):
        AdapterConfig.create("lora", **options)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_must_be_a_probability_below_one(dropout: float) -> None:
    with pytest.raises(ConfigError, match=r"dropout must be a probability in \[0, 1\)"):
        AdapterConfig.create("lora", dropout=dropout)


@pytest.mark.parametrize("options,match", [
    ({"init_weights": "pissa_niter_x"}, "init_weights must be"),
    ({"alpha": math.inf}, "alpha must be a positive finite number"),
    ({"alpha": math.nan}, "alpha must be a positive finite number"),
    ({"target_modules": 3}, "target_modules must be"),
    ({"layers_to_transform": [0, -1]}, "negative index"),
])
def test_other_lora_options_are_validated(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdapterConfig.create("lora", **options)


def test_bad_nonlinearity_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="nonlinearity 'reluu' is unknown. Did you mean 'relu'") as info:
        AdapterConfig.create("houlsby", nonlinearity="reluu")
    assert "gelu" in str(info.value)


@pytest.mark.parametrize("factor", [0, -4, 2.0])
def test_bad_reduction_factor(factor: Any) -> None:
    with pytest.raises(ConfigError, match="reduction_factor must be an integer >= 1"):
        AdapterConfig.create("pfeiffer", reduction_factor=factor)


def test_config_class_refuses_a_method_it_does_not_implement() -> None:
    with pytest.raises(ConfigError, match="LoRAConfig does not implement method 'houlsby'"):
        LoRAConfig(method="houlsby")


@pytest.mark.parametrize("data,match", [
    ({"peft_type": "IA3", "target_modules": ["q_proj"]}, "PEFT method 'IA3' is not supported"),
    ({"peft_type": "LORA", "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "LORA", "target_modules": ["q_proj"], "bias": "all"}, "bias='all'"),
])
def test_unsupported_peft_configs(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AdapterConfig.from_dict(data)


@pytest.mark.parametrize("options,field", [
    ({"lora_bias": True}, "lora_bias"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
    ({"use_qalora": True}, "use_qalora"),
], ids=["lora_bias", "alora", "qalora"])
def test_peft_variants_that_change_the_math_are_refused(tmp_path: Path, options: dict[str, Any], field: str) -> None:
    """Same key names as plain LoRA but another forward pass (or extra tensors): refuse rather than load wrong."""
    with pytest.raises(ConfigError, match=f"PEFT adapter uses {field}"):
        AdapterConfig.from_dict(_peft_json(tmp_path, target_modules=["q_proj"], **options))


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "mica"])
def test_peft_inits_that_change_the_base_are_refused(init: str) -> None:
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}'"):
        AdapterConfig.from_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "init_lora_weights": init})


# -- what inject accepts besides an AdapterConfig ------------------------------------------------------------------
def test_inject_accepts_option_dicts_and_peft_configs() -> None:
    """A dict with 'method' is AdapterConfig.create's options; a peft.LoraConfig converts through its to_dict and
    picks the same modules, ranks and method as PEFT does with it."""
    import copy

    import peft
    from conftest import make_llama
    from peft_oracle import peft_adapted_paths, peft_inner, peft_model

    from lightning_lora.surgery import adapters, inject

    model = make_llama()
    by_dict = inject(copy.deepcopy(model), {"method": "lora", "r": 2, "target_modules": ["q_proj"]})
    assert by_dict == inject(copy.deepcopy(model), AdapterConfig.create("lora", r=2, target_modules=["q_proj"]))

    options = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"], "use_dora": True,
               "rank_pattern": {"down_proj": 3}, "layers_to_transform": [1]}
    ours = copy.deepcopy(model)
    chosen = inject(ours, peft.LoraConfig(**options))
    theirs = peft_model(model, **options)
    assert chosen == peft_adapted_paths(theirs) and chosen
    for path, adapter in ((p, a.adapters["default"]) for p, a in adapters(ours).items()):
        layer = peft_inner(theirs).get_submodule(path)
        assert adapter.config.method == "dora"
        assert (adapter.r, adapter.alpha) == (layer.r["default"], layer.lora_alpha["default"])


def test_all_linear_written_as_a_one_item_list_is_the_shorthand() -> None:
    """``target_modules: [all-linear]`` in YAML means the shorthand; no module can be named so."""
    assert AdapterConfig.create("lora", target_modules=["all-linear"]).target_modules == "all-linear"


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers() -> None:
    """Options computed with NumPy are numbers too; stored as Python numbers the config stays JSON-serializable."""
    import numpy as np

    config = AdapterConfig.create("lora", r=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.1),
                                  layers_to_transform=[np.int64(1)], rank_pattern={"q_proj": np.int32(2)})
    assert (type(config.r), type(config.alpha), type(config.dropout)) == (int, float, float)
    assert config.layers_to_transform == [1] and type(config.rank_pattern["q_proj"]) is int
    assert AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        AdapterConfig.create("lora", r=np.bool_(True))
