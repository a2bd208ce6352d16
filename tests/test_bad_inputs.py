"""A table of bad inputs, each refused with an error that names the option or file, leaving the model as it was.

The README promises: a bad input is an error that says what to change, and leaves the model exactly as it was.
Each row is one mistake a user makes (a mistyped YAML option, a wrong argument, a corrupt or mismatched adapter
file); the test checks the error type, that the message names the option or file, and that ``model_state_hash``
(parameters, buffers, module types, ``requires_grad`` flags, modes, hooks) did not change. Models are built once per
module and deep-copied per row, so the whole table runs in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from conftest import make_gpt2, make_llama, make_plain
from tiny_modules import AttentionNet
from model_state import model_state_hash
from peft_oracle import PEFT_WARNINGS
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_lora.atomic import ExportTargetError
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.export import export_merged
from lightning_lora.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFileError, load_adapter, save_adapter
from lightning_lora.methods.base import MergeError
from lightning_lora.surgery import inject, merge

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]



def _with(method: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = make_llama()
        inject(model, AdapterConfig.create(method, **options), seed=0)
        return model
    return build


BASES: dict[str, Callable[[], nn.Module]] = {
    "llama": make_llama,
    "llama-seed1": lambda: make_llama(seed=1),
    "tied": lambda: make_llama(tie=True),
    "gpt2": make_gpt2,
    "plain": make_plain,
    "mha": AttentionNet,
    "llama+lora": _with("lora", r=2, target_modules=["q_proj", "v_proj"], init_weights=False),
    "llama+houlsby": _with("houlsby"),
}


@functools.cache
def _original(kind: str) -> nn.Module:
    return BASES[kind]()


def fresh(kind: str) -> nn.Module:
    """A private copy of one of the module's models (each is built once)."""
    return copy.deepcopy(_original(kind))


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One adapter saved from ``llama+lora`` (r=2 on q_proj/v_proj); file rows corrupt a copy of it."""
    return save_adapter(fresh("llama+lora"), tmp_path_factory.mktemp("saved") / "adapter")


# -- the actions: each takes the model and a directory holding a fresh copy of the saved adapter as ``a`` -----------
Action = Callable[[nn.Module, Path], Any]


def opts(method: str = "lora", **options: Any) -> Action:
    """inject with a dict of options (what a YAML file or a CLI gives), which builds the config first."""
    return lambda model, d: inject(model, {"method": method, **options})


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Action:
    return lambda model, d: fn(model, *args, **kwargs)


def peft_config(name: str, **options: Any) -> Action:
    def act(model: nn.Module, d: Path) -> Any:
        import peft

        return inject(model, getattr(peft, name)(**options))
    return act


def edit_config(change: Callable[[dict[str, Any]], Any]) -> Action:
    def act(model: nn.Module, d: Path) -> Any:
        path = d / "a" / ADAPTER_CONFIG
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return load_adapter(model, d / "a")
    return act


def raw_config(content: bytes) -> Action:
    def act(model: nn.Module, d: Path) -> Any:
        (d / "a" / ADAPTER_CONFIG).write_bytes(content)
        return load_adapter(model, d / "a")
    return act


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], Any]) -> Action:
    def act(model: nn.Module, d: Path) -> Any:
        path = d / "a" / ADAPTER_WEIGHTS
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {k: handle.get_tensor(k).clone() for k in handle.keys()}
        change(tensors)
        save_file(tensors, str(path), metadata=metadata)
        return load_adapter(model, d / "a")
    return act


def raw_weights(change: Callable[[bytes], bytes]) -> Action:
    def act(model: nn.Module, d: Path) -> Any:
        path = d / "a" / ADAPTER_WEIGHTS
        path.write_bytes(change(path.read_bytes()))
        return load_adapter(model, d / "a")
    return act


def load_from(where: Callable[[Path], Any]) -> Action:
    return lambda model, d: load_adapter(model, where(d))


def remove(name: str) -> Action:
    def act(model: nn.Module, d: Path) -> Any:
        (d / "a" / name).unlink()
        return load_adapter(model, d / "a")
    return act


def _first(tensors: dict[str, torch.Tensor], suffix: str = "lora_A.weight") -> str:
    return min(k for k in tensors if k.endswith(suffix))


def _set(key_suffix: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        key = _first(tensors, key_suffix)
        tensors[key] = make(tensors[key])
    return change


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[1] = value
        return t
    return make


def _pickled(d: Path) -> None:
    path = d / "a" / ADAPTER_WEIGHTS
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k).clone() for k in handle.keys()}
    torch.save(tensors, str(path))


def pickled(model: nn.Module, d: Path) -> Any:
    _pickled(d)
    return load_adapter(model, d / "a")


def houlsby_with_factor(factor: int) -> Action:
    """A Houlsby adapter (reduction_factor 16) whose config was edited to another factor."""
    def act(model: nn.Module, d: Path) -> Any:
        save_adapter(fresh("llama+houlsby"), d / "h")
        path = d / "h" / ADAPTER_CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), "reduction_factor": factor}))
        return load_adapter(model, d / "h")
    return act


def into_foreign_dir(model: nn.Module, d: Path) -> Any:
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("user data")
    return save_adapter(model, d / "mine")


def into_file(model: nn.Module, d: Path) -> Any:
    (d / "run.log").write_text("user data")
    return save_adapter(model, d / "run.log")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    base: str
    action: Action
    error: type[BaseException]
    names: tuple[str, ...]  # each must appear in the message ("{d}" is the row's directory)
    absent: Optional[str] = None  # a path (relative to the row's directory) that must not have been created


def C(id: str, base: str, action: Action, error: type[BaseException], *names: str,
      absent: Optional[str] = None) -> Case:
    return Case(id, base, action, error, names, absent)


NAN, INF = math.nan, math.inf

OPTION_CASES = [
    # r
    C("r-string", "llama", opts(r="8"), ConfigError, "r must be", "drop the quotes"),
    C("r-float", "llama", opts(r=8.0), ConfigError, "r must be"),
    C("r-bool", "llama", opts(r=True), ConfigError, "r must be"),
    C("r-zero", "llama", opts(r=0), ConfigError, "r must be"),
    C("r-negative", "llama", opts(r=-4), ConfigError, "r must be"),
    C("r-none", "llama", opts(r=None), ConfigError, "r must be"),
    C("r-list", "llama", opts(r=[8]), ConfigError, "r must be"),
    C("r-too-large", "llama", opts(r=64, target_modules=["k_proj"]), ConfigError, "r=64", "rank_pattern"),
    # alpha
    C("alpha-string", "llama", opts(alpha="16"), ConfigError, "alpha must be", "drop the quotes"),
    C("alpha-zero", "llama", opts(alpha=0), ConfigError, "alpha must be"),
    C("alpha-negative", "llama", opts(alpha=-8.0), ConfigError, "alpha must be"),
    C("alpha-nan", "llama", opts(alpha=NAN), ConfigError, "alpha must be"),
    C("alpha-inf", "llama", opts(alpha=INF), ConfigError, "alpha must be"),
    C("alpha-bool", "llama", opts(alpha=True), ConfigError, "alpha must be"),
    C("alpha-none", "llama", opts(alpha=None), ConfigError, "alpha must be"),
    C("alpha-list", "llama", opts(alpha=[16]), ConfigError, "alpha must be"),
    # dropout, rslora, init
    C("dropout-string", "llama", opts(dropout="0.1"), ConfigError, "dropout must be"),
    C("dropout-one", "llama", opts(dropout=1.0), ConfigError, "dropout must be"),
    C("dropout-negative", "llama", opts(dropout=-0.1), ConfigError, "dropout must be"),
    C("dropout-bool", "llama", opts(dropout=True), ConfigError, "dropout must be"),
    C("dropout-nan", "llama", opts(dropout=NAN), ConfigError, "dropout must be"),
    C("dropout-percent", "llama", opts(dropout=10), ConfigError, "dropout must be"),
    C("rslora-string", "llama", opts(use_rslora="false"), ConfigError, "use_rslora"),
    C("rslora-int", "llama", opts(use_rslora=1), ConfigError, "use_rslora"),
    C("init-pissa-niter-zero", "llama", opts(init_weights="pissa_niter_0"), ConfigError, "init_weights"),
    C("init-pissa-with-dora", "llama", opts("dora", init_weights="pissa"), ConfigError, "init_weights", "method='lora'"),
    C("init-int", "llama", opts(init_weights=1), ConfigError, "init_weights"),
    C("init-string-true", "llama", opts(init_weights="true"), ConfigError, "init_weights"),
    C("init-float-zero", "llama", opts(init_weights=0.0), ConfigError, "init_weights"),
    # target_modules / exclude_modules
    C("targets-int", "llama", opts(target_modules=3), ConfigError, "target_modules"),
    C("targets-dict", "llama", opts(target_modules={"q_proj": 1}), ConfigError, "target_modules"),
    C("targets-bad-regex", "llama", opts(target_modules="(q_proj"), ConfigError, "target_modules", "regular expression"),
    C("targets-glob-not-regex", "llama", opts(target_modules="*proj"), ConfigError, "target_modules", "regular expression"),
    C("targets-int-item", "llama", opts(target_modules=["q_proj", 3]), ConfigError, "target_modules[1]"),
    C("targets-nested-list", "llama", opts(target_modules=["q_proj", ["v_proj"]]), ConfigError, "target_modules[1]",
      "nested"),
    C("targets-none-item", "llama", opts(target_modules=[None]), ConfigError, "target_modules[0]"),
    C("targets-empty-name", "llama", opts(target_modules=["q_proj", ""]), ConfigError, "target_modules[1]"),
    C("targets-empty-string", "llama", opts(target_modules=""), ConfigError, "target_modules"),
    C("targets-empty-list", "llama", opts(target_modules=[]), ConfigError, "target_modules=[]"),
    C("targets-all-linear-mixed", "llama", opts(target_modules=["all-linear", "q_proj"]), ConfigError,
      "target_modules", "all-linear"),
    C("targets-typo", "llama", opts(target_modules=["q_prj"]), ConfigError, "target_modules", "q_proj"),
    C("targets-partial-name", "llama", opts(target_modules=["proj"]), ConfigError, "target_modules"),
    C("targets-regex-nothing", "gpt2", opts(target_modules=r".*\.c_atn"), ConfigError, "target_modules", "c_attn"),
    C("targets-regex-is-not-search", "llama", opts(target_modules="q_proj"), ConfigError, "target_modules",
      "give a list such as ['q_proj']"),
    C("targets-activation", "llama", opts(target_modules=["act_fn"]), ConfigError, "act_fn", "SiLU"),
    C("targets-layernorm", "llama", opts(target_modules=["input_layernorm"]), ConfigError, "input_layernorm"),
    C("targets-mha-out-proj", "mha", opts(target_modules=["out_proj"]), ConfigError, "out_proj",
      "MultiheadAttention"),
    C("pissa-on-embedding", "plain", opts(target_modules=["embed", "head"], init_weights="pissa"), ConfigError, "embed"),
    C("exclude-bad-regex", "llama", opts(exclude_modules="[bad"), ConfigError, "exclude_modules"),
    C("exclude-int-item", "llama", opts(exclude_modules=["q_proj", 1]), ConfigError, "exclude_modules[1]"),
    C("exclude-int", "llama", opts(exclude_modules=5), ConfigError, "exclude_modules"),
    C("exclude-all-linear", "llama", opts(exclude_modules="all-linear"), ConfigError, "exclude_modules"),
    C("exclude-everything", "llama", opts(target_modules=["q_proj"], exclude_modules=["q_proj"]), ConfigError,
      "exclude_modules"),
    # layers_to_transform / layers_pattern
    C("layers-string", "llama", opts(layers_to_transform="0"), ConfigError, "layers_to_transform"),
    C("layers-float", "llama", opts(layers_to_transform=[0.0]), ConfigError, "layers_to_transform"),
    C("layers-bool-item", "llama", opts(layers_to_transform=[True]), ConfigError, "layers_to_transform"),
    C("layers-bool", "llama", opts(layers_to_transform=True), ConfigError, "layers_to_transform"),
    C("layers-nested", "llama", opts(layers_to_transform=[[0, 1]]), ConfigError, "layers_to_transform"),
    C("layers-negative", "llama", opts(layers_to_transform=[-1]), ConfigError, "layers_to_transform"),
    C("layers-empty", "llama", opts(layers_to_transform=[]), ConfigError, "layers_to_transform"),
    C("layers-dict", "llama", opts(layers_to_transform={"0": 1}), ConfigError, "layers_to_transform"),
    C("layers-out-of-range", "llama", opts(target_modules=["q_proj"], layers_to_transform=[5]), ConfigError,
      "layers_to_transform=[5]", "[0, 1]"),
    C("layers-pattern-int", "llama", opts(layers_to_transform=[0], layers_pattern=3), ConfigError, "layers_pattern"),
    C("layers-pattern-int-item", "llama", opts(layers_to_transform=[0], layers_pattern=["layers", 1]), ConfigError,
      "layers_pattern"),
    C("layers-pattern-empty", "llama", opts(layers_to_transform=[0], layers_pattern=""), ConfigError,
      "layers_pattern"),
    C("layers-pattern-empty-list", "llama", opts(layers_to_transform=[0], layers_pattern=[]), ConfigError,
      "layers_pattern"),
    C("layers-pattern-bad-regex", "llama", opts(layers_to_transform=[0], layers_pattern="(layers"), ConfigError,
      "layers_pattern"),
    C("layers-pattern-alone", "llama", opts(layers_pattern="layers"), ConfigError, "layers_pattern",
      "layers_to_transform"),
    C("layers-pattern-wrong-name", "llama", opts(target_modules=["q_proj"], layers_to_transform=[0],
                                                 layers_pattern="blocks"), ConfigError, "layers_pattern", "'layers'"),
    C("layers-pattern-gpt2-wrong", "gpt2", opts(target_modules=["c_attn"], layers_to_transform=[0],
                                                layers_pattern="layers"), ConfigError, "layers_pattern", "'h'"),
    # rank_pattern / alpha_pattern
    C("rank-pattern-list", "llama", opts(rank_pattern=["q_proj", 4]), ConfigError, "rank_pattern"),
    C("rank-pattern-string", "llama", opts(rank_pattern="q_proj=4"), ConfigError, "rank_pattern"),
    C("rank-pattern-bad-regex", "llama", opts(rank_pattern={"(q": 4}), ConfigError, "rank_pattern"),
    C("rank-pattern-zero", "llama", opts(rank_pattern={"q_proj": 0}), ConfigError, "rank_pattern['q_proj']"),
    C("rank-pattern-string-value", "llama", opts(rank_pattern={"q_proj": "4"}), ConfigError, "rank_pattern['q_proj']"),
    C("rank-pattern-float-value", "llama", opts(rank_pattern={"q_proj": 2.5}), ConfigError, "rank_pattern['q_proj']"),
    C("rank-pattern-bool-value", "llama", opts(rank_pattern={"q_proj": True}), ConfigError, "rank_pattern['q_proj']"),
    C("rank-pattern-int-key", "llama", opts(rank_pattern={3: 4}), ConfigError, "rank_pattern"),
    C("rank-pattern-typo", "llama", opts(target_modules=["q_proj", "v_proj"], rank_pattern={"q_prj": 4}), ConfigError,
      "rank_pattern", "q_prj", "q_proj, v_proj"),
    C("rank-pattern-untargeted", "llama", opts(target_modules=["q_proj"], rank_pattern={"k_proj": 4}), ConfigError,
      "rank_pattern", "k_proj"),
    C("rank-pattern-too-large", "llama", opts(target_modules=["q_proj"], rank_pattern={"q_proj": 99}), ConfigError,
      "r=99"),
    C("alpha-pattern-nan", "llama", opts(alpha_pattern={"v_proj": NAN}), ConfigError, "alpha_pattern['v_proj']"),
    C("alpha-pattern-inf", "llama", opts(alpha_pattern={"v_proj": INF}), ConfigError, "alpha_pattern['v_proj']"),
    C("alpha-pattern-string-value", "llama", opts(alpha_pattern={"v_proj": "8"}), ConfigError,
      "alpha_pattern['v_proj']"),
    C("alpha-pattern-none-value", "llama", opts(alpha_pattern={"v_proj": None}), ConfigError,
      "alpha_pattern['v_proj']"),
    C("alpha-pattern-zero", "llama", opts(alpha_pattern={"v_proj": 0}), ConfigError, "alpha_pattern['v_proj']"),
    C("alpha-pattern-bad-regex", "llama", opts(alpha_pattern={"[v": 8}), ConfigError, "alpha_pattern"),
    C("alpha-pattern-pairs", "llama", opts(alpha_pattern=[("v_proj", 8)]), ConfigError, "alpha_pattern"),
    C("alpha-pattern-typo", "llama", opts(target_modules=["v_proj"], alpha_pattern={"v_prj": 8}), ConfigError,
      "alpha_pattern", "v_prj"),
    # method and unknown options
    C("method-typo", "llama", opts("lorra"), ConfigError, "lorra", "lora"),
    C("method-int", "llama", opts(3), ConfigError, "method"),
    C("method-none", "llama", opts(None), ConfigError, "method"),
    C("option-typo", "llama", opts(alpah=4), ConfigError, "alpah", "alpha"),
    C("option-of-other-method", "llama", opts(reduction_factor=4), ConfigError, "reduction_factor"),
    C("dora-r-string", "llama", opts("dora", r="2"), ConfigError, "r must be"),
    C("houlsby-factor-string", "llama", opts("houlsby", reduction_factor="16"), ConfigError, "reduction_factor"),
    C("houlsby-factor-zero", "llama", opts("houlsby", reduction_factor=0), ConfigError, "reduction_factor"),
    C("houlsby-factor-float", "llama", opts("houlsby", reduction_factor=2.0), ConfigError, "reduction_factor"),
    C("houlsby-factor-bool", "llama", opts("houlsby", reduction_factor=True), ConfigError, "reduction_factor"),
    C("houlsby-nonlinearity-int", "llama", opts("houlsby", nonlinearity=3), ConfigError, "nonlinearity"),
    C("houlsby-nonlinearity-typo", "llama", opts("houlsby", nonlinearity="reluu"), ConfigError, "nonlinearity",
      "'relu'"),
    C("houlsby-nonlinearity-none", "llama", opts("houlsby", nonlinearity=None), ConfigError, "nonlinearity"),
    C("pfeiffer-takes-no-r", "llama", opts("pfeiffer", r=4), ConfigError, "'r'"),
    C("houlsby-not-found", "plain", opts("houlsby"), ConfigError, "target_modules"),
]

API_CASES = [
    C("inject-string", "llama", call(inject, "lora"), TypeError, "AdapterConfig.create"),
    C("inject-none", "llama", call(inject, None), TypeError, "AdapterConfig.create"),
    C("inject-int", "llama", call(inject, 42), TypeError, "AdapterConfig.create"),
    C("inject-list", "llama", call(inject, ["q_proj"]), TypeError, "AdapterConfig.create"),
    C("inject-config-class", "llama", call(inject, AdapterConfig), TypeError, "AdapterConfig.create"),
    C("inject-dict-without-method", "llama", call(inject, {"r": 4}), ConfigError, "'method'", "AdapterConfig.create"),
    C("inject-dict-unknown-key", "llama", call(inject, {"method": "lora", "rank": 4}), ConfigError, "'rank'"),
    C("inject-peft-dict-bad-r", "llama", call(inject, {"peft_type": "LORA", "r": "4", "target_modules": ["q_proj"]}),
      ConfigError, "r must be"),
    C("inject-swapped-arguments", "llama", lambda model, d: inject(AdapterConfig.create("lora"), model), TypeError,
      "nn.Module"),
    C("inject-peft-no-targets", "llama", peft_config("LoraConfig", r=4), ConfigError, "target_modules"),
    C("inject-peft-modules-to-save", "llama",
      peft_config("LoraConfig", target_modules=["q_proj"], modules_to_save=["lm_head"]), ConfigError,
      "modules_to_save"),
    C("inject-peft-bias", "llama", peft_config("LoraConfig", target_modules=["q_proj"], bias="all"), ConfigError,
      "bias"),
    C("inject-peft-ia3", "llama", peft_config("IA3Config", target_modules=["q_proj"], feedforward_modules=[]),
      ConfigError, "IA3"),
    C("inject-peft-mica", "llama", peft_config("LoraConfig", target_modules=["q_proj"], init_lora_weights="mica"),
      ConfigError, "init_lora_weights"),
    C("inject-peft-orthogonal-init", "llama",
      peft_config("LoraConfig", target_modules=["q_proj"], init_lora_weights="orthogonal"), ConfigError,
      "init_lora_weights"),
    C("inject-twice", "llama+lora", opts(target_modules=["k_proj"]), ConfigError, "unload"),
    C("merge-inserted", "llama+houlsby", call(merge), MergeError, "save_adapter"),
    C("export-tokenizer-name", "llama+lora", lambda m, d: export_merged(m, d / "out", tokenizer="HuggingFaceTB/x"),
      TypeError, "tokenizer", absent="out"),
    C("export-tokenizer-int", "llama+lora", lambda m, d: export_merged(m, d / "out", tokenizer=3), TypeError,
      "tokenizer", absent="out"),
    C("export-merged-inserted", "llama+houlsby", lambda m, d: export_merged(m, d / "out"), MergeError, "save_adapter",
      absent="out"),
    C("export-into-file", "llama+lora", lambda m, d: export_merged(m, d / "a" / ADAPTER_CONFIG), ExportTargetError,
      ADAPTER_CONFIG),
    C("save-without-adapters", "llama", lambda m, d: save_adapter(m, d / "out"), AdapterFileError, "no adapters",
      absent="out"),
    C("save-into-file", "llama+lora", into_file, ExportTargetError, "run.log"),
    C("save-into-foreign-dir", "llama+lora", into_foreign_dir, ExportTargetError, "notes.txt"),
    C("load-none", "llama", load_from(lambda d: None), TypeError, "adapter directory"),
    C("load-int", "llama", load_from(lambda d: 3), TypeError, "adapter directory"),
    C("load-weights-file", "llama", load_from(lambda d: d / "a" / ADAPTER_WEIGHTS), AdapterFileError, "is a file",
      "(here {d}/a)"),
    C("load-into-adapted-model", "llama+lora", load_from(lambda d: d / "a"), ConfigError, "unload"),
    C("load-onto-gpt2", "gpt2", load_from(lambda d: d / "a"), ConfigError, "target_modules"),
]

FILE_CASES = [
    C("missing-dir", "llama", load_from(lambda d: d / "nope"), AdapterFileError, "{d}/nope/adapter_config.json"),
    C("missing-weights", "llama", remove(ADAPTER_WEIGHTS), AdapterFileError, ADAPTER_WEIGHTS, "does not exist"),
    C("missing-config", "llama", remove(ADAPTER_CONFIG), AdapterFileError, ADAPTER_CONFIG, "does not exist"),
    C("config-not-utf8", "llama", raw_config(b'{"peft_type": "LORA", "r": 2, "x": "\xff\xfe"}'), AdapterFileError,
      ADAPTER_CONFIG, "UTF-8"),
    C("config-utf16", "llama", raw_config('{"peft_type": "LORA"}'.encode("utf-16")), AdapterFileError,
      ADAPTER_CONFIG),
    C("config-null", "llama", raw_config(b"null"), AdapterFileError, ADAPTER_CONFIG, "null"),
    C("config-number", "llama", raw_config(b"3"), AdapterFileError, ADAPTER_CONFIG, "int"),
    C("config-string", "llama", raw_config(b'"lora"'), AdapterFileError, ADAPTER_CONFIG, "str"),
    C("config-list", "llama", raw_config(b'[{"peft_type": "LORA"}]'), AdapterFileError, ADAPTER_CONFIG, "list"),
    C("config-empty", "llama", raw_config(b""), AdapterFileError, ADAPTER_CONFIG, "not valid JSON"),
    C("config-truncated", "llama", raw_config(b'{"peft_type": "LORA", "r": 4,'), AdapterFileError, ADAPTER_CONFIG,
      "not valid JSON"),
    C("config-untagged", "llama", raw_config(b'{"r": 4}'), ConfigError, ADAPTER_CONFIG, "peft_type"),
    C("config-unknown-method", "llama", raw_config(b'{"method": "lorax"}'), ConfigError, ADAPTER_CONFIG, "lorax"),
    C("config-unknown-field", "llama", raw_config(b'{"method": "lora", "rank": 2}'), ConfigError, ADAPTER_CONFIG,
      "rank"),
    C("config-peft-ia3", "llama", edit_config(lambda c: c.update(peft_type="IA3")), ConfigError, ADAPTER_CONFIG,
      "IA3"),
    C("config-r-string", "llama", edit_config(lambda c: c.update(r="2")), ConfigError, ADAPTER_CONFIG, "r must be"),
    C("config-alpha-zero", "llama", edit_config(lambda c: c.update(lora_alpha=0)), ConfigError, ADAPTER_CONFIG,
      "alpha"),
    C("config-alpha-nan", "llama", edit_config(lambda c: c.update(lora_alpha=NAN)), ConfigError, ADAPTER_CONFIG,
      "alpha"),
    C("config-dropout", "llama", edit_config(lambda c: c.update(lora_dropout=1.5)), ConfigError, ADAPTER_CONFIG,
      "dropout"),
    C("config-targets-int", "llama", edit_config(lambda c: c.update(target_modules=[1, 2])), ConfigError,
      ADAPTER_CONFIG, "target_modules[0]"),
    C("config-targets-typo", "llama", edit_config(lambda c: c.update(target_modules=["q_prj"])), ConfigError,
      "target_modules", "q_proj"),
    C("config-wrong-r", "llama", edit_config(lambda c: c.update(r=4)), AdapterFileError, ADAPTER_CONFIG, "r=4",
      "rank 2", '"r": 2'),
    C("config-missing-r", "llama", edit_config(lambda c: c.pop("r")), AdapterFileError, ADAPTER_CONFIG, "no 'r'",
      '"r": 2'),
    C("config-wrong-rank-pattern", "llama", edit_config(lambda c: c.update(rank_pattern={"q_proj": 4})),
      AdapterFileError, ADAPTER_CONFIG, "rank_pattern"),
    C("config-no-targets", "llama", edit_config(lambda c: c.update(target_modules=None)), ConfigError,
      ADAPTER_CONFIG, "target_modules"),
    C("config-bottleneck-wrong-factor", "llama", houlsby_with_factor(8), AdapterFileError, "reduction_factor"),
    C("config-bottleneck-factor", "llama", raw_config(b'{"method": "houlsby", "reduction_factor": "4"}'),
      ConfigError, ADAPTER_CONFIG, "reduction_factor"),
    C("config-is-a-directory", "llama", lambda m, d: ((d / "a" / ADAPTER_CONFIG).unlink(),
                                                      (d / "a" / ADAPTER_CONFIG).mkdir(),
                                                      load_adapter(m, d / "a")), AdapterFileError, ADAPTER_CONFIG),
    C("weights-truncated", "llama", raw_weights(lambda b: b[: len(b) // 2]), AdapterFileError, ADAPTER_WEIGHTS,
      "truncated"),
    C("weights-empty", "llama", raw_weights(lambda b: b""), AdapterFileError, ADAPTER_WEIGHTS),
    C("weights-garbage", "llama", raw_weights(lambda b: bytes(range(256)) * 4), AdapterFileError, ADAPTER_WEIGHTS),
    C("weights-bad-header", "llama", raw_weights(lambda b: b[:8] + b"{not json" + b[17:]), AdapterFileError,
      ADAPTER_WEIGHTS),
    C("weights-pickled", "llama", pickled, AdapterFileError, ADAPTER_WEIGHTS, "pickled"),
    C("weights-nan", "llama", edit_tensors(_set("lora_B.weight", _poison(NAN))), AdapterFileError, ADAPTER_WEIGHTS,
      "lora_B.weight", "NaN"),
    C("weights-inf", "llama", edit_tensors(_set("lora_A.weight", _poison(INF))), AdapterFileError, ADAPTER_WEIGHTS,
      "lora_A.weight", "Inf"),
    C("weights-minus-inf", "llama", edit_tensors(_set("lora_A.weight", _poison(-INF))), AdapterFileError,
      ADAPTER_WEIGHTS, "Inf"),
    C("weights-int32", "llama", edit_tensors(_set("lora_A.weight", lambda t: t.to(torch.int32))), AdapterFileError,
      ADAPTER_WEIGHTS, "torch.int32"),
    C("weights-int8", "llama", edit_tensors(_set("lora_B.weight", lambda t: t.to(torch.int8))), AdapterFileError,
      ADAPTER_WEIGHTS, "torch.int8"),
    C("weights-bool", "llama", edit_tensors(_set("lora_B.weight", lambda t: t > 0)), AdapterFileError,
      ADAPTER_WEIGHTS, "torch.bool"),
    C("weights-missing-key", "llama", edit_tensors(lambda t: t.pop(_first(t))), AdapterFileError, "{d}/a",
      "missing"),
    C("weights-extra-key", "llama", edit_tensors(lambda t: t.update({"base_model.model.x.lora_A.weight":
                                                                      torch.zeros(2, 2)})),
      AdapterFileError, "{d}/a", "unexpected"),
    C("weights-no-tensors", "llama", lambda m, d: (save_file({}, str(d / "a" / ADAPTER_WEIGHTS)),
                                                   load_adapter(m, d / "a")), AdapterFileError, "{d}/a", "missing"),
    C("weights-wrong-in-shape", "llama", edit_tensors(_set("lora_A.weight", lambda t: torch.zeros(t.shape[0], 5))),
      AdapterFileError, "{d}/a", "another shape"),
    C("weights-transposed", "llama", edit_tensors(_set("lora_B.weight", lambda t: t.T.contiguous())),
      AdapterFileError, "{d}/a"),
    C("weights-other-base", "llama-seed1", load_from(lambda d: d / "a"), AdapterFileError, "{d}/a", "check_base=False"),
]

CASES = OPTION_CASES + API_CASES + FILE_CASES


def test_the_table_holds_over_a_hundred_distinct_bad_inputs() -> None:
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_names_its_fix_and_changes_nothing(case: Case, saved_adapter: Path, tmp_path: Path) -> None:
    shutil.copytree(saved_adapter, tmp_path / "a")
    model = fresh(case.base)
    before = model_state_hash(model)
    with pytest.raises(case.error) as info:
        case.action(model, tmp_path)
    message = str(info.value)
    for name in case.names:
        assert name.replace("{d}", str(tmp_path)) in message, f"{name!r} not in: {message}"
    assert model_state_hash(model) == before, "the model changed although the call failed"
    if case.absent:
        assert not (tmp_path / case.absent).exists()


def test_model_state_hash_sees_each_kind_of_change() -> None:
    """The hash is only useful if it notices what a half-done injection would leave behind."""
    base = fresh("llama")
    before = model_state_hash(base)
    assert model_state_hash(copy.deepcopy(base)) == before
    changes: list[Callable[[nn.Module], Any]] = [
        lambda m: m.model.layers[0].self_attn.q_proj.weight.data.view(-1)[0].add_(1e-3),
        lambda m: m.model.rotary_emb.inv_freq.mul_(2),
        lambda m: m.model.layers[0].mlp.gate_proj.weight.requires_grad_(False),
        lambda m: m.train(),
        lambda m: setattr(m.model.layers[0].mlp, "act_fn", nn.GELU()),
        lambda m: m.model.norm.register_forward_hook(lambda *a: None),
        lambda m: setattr(m.model.layers[1].self_attn, "q_proj", m.model.layers[0].self_attn.q_proj),
        lambda m: m.model.layers[0].self_attn.q_proj.to(torch.float64),
    ]
    for change in changes:
        model = copy.deepcopy(base)
        change(model)
        assert model_state_hash(model) != before, change


def _update(layer: nn.Module) -> nn.Module:
    """The LoRA update on an adapted layer (the layer itself, or its default entry where layers hold several)."""
    return layer.adapters["default"] if isinstance(getattr(layer, "adapters", None), nn.ModuleDict) else layer


def test_tied_adapter_tensors_save_and_load() -> None:
    """A user who ties two adapters' tensors still gets a file (one copy per key, as PEFT writes), not safetensors'
    'share memory' error, and it loads back to the same outputs."""
    import tempfile

    model = fresh("llama+lora")
    first, second = (_update(layer.self_attn.q_proj) for layer in model.model.layers)
    second.lora_B = first.lora_B
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "a")
        again = fresh("llama")
        load_adapter(again, Path(tmp) / "a")
    tokens = torch.randint(3, 60, (1, 6), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(tokens).logits, again(tokens).logits, atol=1e-6)


def test_unused_pattern_keys_in_a_peft_file_still_load(saved_adapter: Path, tmp_path: Path) -> None:
    """PEFT keeps rank/alpha pattern keys that matched nothing in the files it writes; they cannot change what loads,
    so loading ignores them (inject, where they are a user's typo, refuses them)."""
    shutil.copytree(saved_adapter, tmp_path / "a")
    path = tmp_path / "a" / ADAPTER_CONFIG
    data = json.loads(path.read_text())
    data.update(rank_pattern={"gate_proj": 7}, alpha_pattern={"no_such_module": 3.0})
    path.write_text(json.dumps(data))
    model = fresh("llama")
    load_adapter(model, tmp_path / "a")
    tokens = torch.randint(3, 60, (1, 6), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(tokens).logits, fresh("llama+lora")(tokens).logits, atol=1e-6)
