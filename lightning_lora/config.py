"""Adapter configuration: one validated dataclass per method family, with a JSON round trip.

LoRA-family configs read and write PEFT's ``adapter_config.json`` vocabulary (``lora_alpha``, ``use_dora``, ...), so
an adapter we export loads in PEFT and one PEFT wrote loads here. Methods PEFT lacks use our own keys, tagged by
``"method"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional, Union

TargetSpec = Union[str, list[str], None]

DEFAULT_ADAPTER = "default"  # the name of an adapter injected without one
NONLINEARITIES = ("relu", "gelu", "silu", "swish", "tanh")
ALL_LINEAR = "all-linear"


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the problem and the fix."""


def _closest(word: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""


# -- option checks: each names the option, what it got and what to write instead -----------------------------------
def _got(value: Any) -> str:
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = " (a quoted number in YAML/JSON is a string: drop the quotes)"
        except ValueError:
            pass
    return f"got {value!r} ({type(value).__name__}){hint}"


def _is_int(value: Any) -> bool:
    """Python and NumPy integers; not bools (YAML's ``true`` is not a rank)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _plain(value: Any) -> Any:
    """NumPy scalars as Python numbers, so the config stays JSON-serializable."""
    return value if type(value) in (int, float) else (int(value) if _is_int(value) else float(value))


def _positive_int(option: str, value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{option} must be a positive integer such as 8, {_got(value)}.")
    return _plain(value)


def _positive_real(option: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{option} must be a positive finite number such as 16, {_got(value)}.")
    return _plain(value)


def _probability(option: str, value: Any) -> float:
    """A dropout probability in [0, 1)."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{option} must be a probability in [0, 1) such as 0.05, {_got(value)}.")
    return _plain(value)


def _boolean(option: str, value: Any) -> bool:
    """A flag; 1/0 and "true" strings are refused (a YAML typo should not pass as a flag)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{option} must be true or false, {_got(value)}.")
    return value


def _regex(option: str, pattern: str, hint: str = "") -> str:
    """``pattern`` if it compiles; regexes are checked when the config is built, not when they first meet a model."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(
            f"{option}: {pattern!r} is not a valid regular expression ({err}). Escape special characters with a "
            f"backslash (e.g. r'layers\\.0\\.q_proj'){hint}."
        ) from None
    return pattern


def _target_spec(option: str, value: Any, exclude: bool) -> TargetSpec:
    """A list of module names (names are literal, not regexes, as in PEFT) or one regex string, type-checked.
    ``exclude``: the spec is ``exclude_modules``, which may be empty and cannot be the ``all-linear`` shorthand."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{option} is an empty string; give module names such as ['q_proj', 'v_proj'] or a regex.")
        if value.lower() == ALL_LINEAR and not exclude:
            return value
        if value.lower() == ALL_LINEAR:
            raise ConfigError(f"{option}='all-linear' is only a target_modules shorthand; list the modules to exclude.")
        return _regex(option, value, ", or give a list of plain module names")
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ConfigError(
            f"{option} must be a list of module names (e.g. ['q_proj', 'v_proj']) or one regex string, {_got(value)}."
        )
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            nested = " (nested lists are not allowed)" if isinstance(item, (list, tuple)) else ""
            raise ConfigError(
                f"{option}[{i}] must be a non-empty module name string such as 'q_proj'{nested}, {_got(item)}."
            )
    names = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if not names and not exclude:
        raise ConfigError(f"{option}=[] targets nothing; list module names such as ['q_proj', 'v_proj'] or use 'all-linear'.")
    if any(n.lower() == ALL_LINEAR for n in names) and not exclude:
        if len(names) > 1:
            raise ConfigError(f"{option} mixes 'all-linear' with module names {names}; use one or the other.")
        return ALL_LINEAR  # [all-linear] in YAML means the shorthand, not a module of that name
    return names or None


def _layer_indexes(value: Any) -> list[int] | None:
    if value is None:
        return None
    items = [value] if _is_int(value) else value
    if not isinstance(items, (list, tuple)) or not all(_is_int(i) for i in items):
        raise ConfigError(
            f"layers_to_transform must be a layer index or a list of them, such as [0, 1, 2], {_got(value)}."
        )
    if not items:
        raise ConfigError("layers_to_transform=[] selects no layer; list layer indexes or leave it unset for all layers.")
    if any(i < 0 for i in items):
        raise ConfigError(f"layers_to_transform holds a negative index: {list(items)}. Layer indexes start at 0.")
    return [int(i) for i in items]


def _layers_pattern(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) and p for p in items):
        raise ConfigError(
            f"layers_pattern must be the name of the module list that holds the layers (e.g. 'layers', or "
            f"['layers', 'h']), {_got(value)}."
        )
    for pattern in items:
        _regex("layers_pattern", pattern)
    return value if isinstance(value, str) else list(items)


def _pattern_map(option: str, value: Any, check_value: Any) -> dict[str, Any]:
    """``rank_pattern``/``alpha_pattern``: module name or regex -> value, with both sides checked."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{option} must be a mapping from module name or regex to a value (e.g. {{'q_proj': 4}}), {_got(value)}."
        )
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{option} keys must be module names or regexes (strings), {_got(key)}.")
        out[_regex(f"{option} key", key)] = check_value(f"{option}[{key!r}]", item)
    return out


@dataclass
class AdapterConfig:
    """What every method shares: its name and which modules it attaches to.

    ``target_modules`` follows PEFT: a list of names matches a module whose dotted path equals a name or ends with
    ``"." + name``; a string is a regular expression that must match the whole path; ``"all-linear"`` picks every
    linear layer except the output head. ``exclude_modules`` uses the same rules to drop matches.
    ``layers_to_transform`` keeps only modules in the given layer indexes, found by ``layers_pattern`` (for example
    ``"layers"``) or by PEFT's rule without it (see ``targeting.layer_index``); a target listed as a full path is
    kept whatever its layer, as in PEFT. Every option is type-checked here, so a mistyped YAML value fails when the
    config is built, naming the option.
    """

    method: str = ""
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    layers_to_transform: Union[int, list[int], None] = None
    layers_pattern: Union[str, list[str], None] = None

    METHODS: ClassVar[tuple[str, ...]] = ()
    PEFT_TYPE: ClassVar[Optional[str]] = None  # PEFT's peft_type for configs that read and write PEFT's files

    def __post_init__(self) -> None:
        if self.method not in self.METHODS:
            raise ConfigError(
                f"{type(self).__name__} does not implement method {self.method!r}; it implements "
                f"{', '.join(self.METHODS)}."
            )
        self.target_modules = _target_spec("target_modules", self.target_modules, exclude=False)
        self.exclude_modules = _target_spec("exclude_modules", self.exclude_modules, exclude=True)
        self.layers_to_transform = _layer_indexes(self.layers_to_transform)
        self.layers_pattern = _layers_pattern(self.layers_pattern)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} does nothing without layers_to_transform; give the layer "
                "indexes too (e.g. layers_to_transform=[0, 1]) or drop layers_pattern (PEFT refuses it as well)."
            )

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Our JSON form: every field, tagged by ``method``."""
        return dataclasses.asdict(self)

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict[str, Any]:
        """The ``adapter_config.json`` of an adapter built from this config: ``layers`` are the adapters by module
        path (``surgery.adapters``), ``module_paths`` every module of the model, ``model_info`` holds
        ``base_model_name_or_path`` and ``task_type``. Targets are written as the exact paths adapted, so the file
        picks the same modules whatever pattern chose them. Configs with a ``PEFT_TYPE`` write PEFT's form."""
        data = self.to_dict()
        target_spec = exact_targets(list(layers), module_paths)[0]
        data.update(target_modules=target_spec, exclude_modules=None, layers_to_transform=None, layers_pattern=None)
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """The config of a PEFT ``adapter_config.json`` whose ``peft_type`` is ``cls.PEFT_TYPE``."""
        raise ConfigError(f"{cls.__name__} cannot read PEFT configs.")

    @staticmethod
    def create(method: str = "lora", **options: Any) -> "AdapterConfig":
        """Build the config class for ``method`` from keyword options, rejecting options that method does not take."""
        cls = config_class_for(method)
        unknown = [k for k in options if k not in cls.option_names()]
        if unknown:
            hints = "".join(_closest(k, cls.option_names()) for k in unknown)
            raise ConfigError(
                f"Method {method!r} takes no option {', '.join(map(repr, unknown))}.{hints} "
                f"Its options are: {', '.join(n for n in cls.option_names() if n != 'method')}."
            )
        return cls(method=method, **options)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "AdapterConfig":
        """Read our JSON form or PEFT's ``adapter_config.json``; an unknown method is a clear error."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"An adapter config must be a JSON object of options (e.g. {{\"method\": \"lora\", \"r\": 8}}), "
                f"{_got(data)}."
            )
        if "peft_type" in data:
            return peft_config_class_for(data["peft_type"]).from_peft_dict(dict(data))
        if "method" not in data:
            raise ConfigError(
                "Adapter config has neither 'method' (lightning_lora) nor 'peft_type' (PEFT): is this an adapter_config.json?"
            )
        method = data["method"]
        cls = config_class_for(method)
        known = set(cls.option_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Adapter config for {method!r} has unknown fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {}  # method name -> config class; filled by ``register_config``


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make ``cls`` the config of each method in ``cls.METHODS`` (method files register theirs)."""
    for method in cls.METHODS:
        CONFIG_CLASSES[method] = cls
    return cls


@register_config
@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA (Hu et al. 2021, arXiv 2106.09685) and DoRA (Liu et al. 2024, arXiv 2402.09353).

    The update is ``(alpha / r) * B A`` (rsLoRA, arXiv 2312.03732: ``alpha / sqrt(r)``). ``init_weights`` is
    ``True`` (A Kaiming-uniform, B zero: PEFT's default), ``"gaussian"`` (A normal with std 1/r, B zero),
    ``False`` (both random: the adapter changes the output from the start; for tests), or one that moves part of the
    base weight into A and B and leaves the residual in the base (LoRA on linear layers only; ``methods/lora_init.py``):
    ``"pissa"`` (PiSSA, arXiv 2404.02948: the r principal singular components), ``"pissa_niter_<n>"`` (the same from
    a randomized SVD with n subspace iterations) or ``"olora"`` (OLoRA, arXiv 2406.01775: a QR decomposition).
    ``loraplus_lr_ratio`` turns on LoRA+ (arXiv 2402.12354): B trains at that multiple of the optimizer's learning
    rate (``True``: 16), and adapters of embeddings at ``loraplus_lr_embedding`` (None: 1e-6, as PEFT).
    ``rank_pattern``/``alpha_pattern`` map a module name or regex to its own r/alpha, as in PEFT.
    With no ``target_modules``, every linear layer but the output head is adapted (``"all-linear"``, as QLoRA).
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: Union[bool, str] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    loraplus_lr_ratio: Union[float, bool, None] = None
    loraplus_lr_embedding: Optional[float] = None

    METHODS: ClassVar[tuple[str, ...]] = ("lora", "dora")
    PEFT_TYPE: ClassVar[Optional[str]] = "LORA"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        super().__post_init__()
        self.r = _positive_int("r", self.r)
        self.alpha = _positive_real("alpha", self.alpha)
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be a probability in [0, 1) such as 0.05, {_got(self.dropout)}.")
        self.dropout = _plain(self.dropout)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be true or false, {_got(self.use_rslora)}.")
        # ``1 == True`` and ``0.0 == False`` in Python, so membership in (True, False) would let numbers through
        if not (isinstance(self.init_weights, bool) or self.init_weights == "gaussian" or self.changes_base):
            raise ConfigError(f"init_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<n>' (n >= 1, "
                              f"e.g. 'pissa_niter_4') or 'olora', {_got(self.init_weights)}.")
        if self.changes_base and self.method != "lora":
            raise ConfigError(f"init_weights={self.init_weights!r} moves part of the base weight into A and B, which "
                              f"plain LoRA supports and {self.method!r} does not; use method='lora' or another init.")
        self.rank_pattern = _pattern_map("rank_pattern", self.rank_pattern, _positive_int)
        self.alpha_pattern = _pattern_map("alpha_pattern", self.alpha_pattern, _positive_real)
        if self.loraplus_lr_ratio is True:
            self.loraplus_lr_ratio = 16.0  # the paper's suggestion for LLMs
        if self.loraplus_lr_ratio is not None:
            self.loraplus_lr_ratio = _positive_real("loraplus_lr_ratio", self.loraplus_lr_ratio)
        if self.loraplus_lr_embedding is not None:
            if self.loraplus_lr_ratio is None:
                raise ConfigError("loraplus_lr_embedding is a LoRA+ option; set loraplus_lr_ratio (e.g. 16) too, or "
                                  "drop it.")
            self.loraplus_lr_embedding = _positive_real("loraplus_lr_embedding", self.loraplus_lr_embedding)

    @property
    def changes_base(self) -> bool:
        """Whether ``init_weights`` moves part of the base weight into the adapter (PiSSA, OLoRA)."""
        init = self.init_weights
        if not isinstance(init, str):
            return False
        niter = init.removeprefix("pissa_niter_")
        return init in ("pissa", "olora") or (niter != init and niter.isdigit() and int(niter) >= 1)

    @property
    def use_dora(self) -> bool:
        return self.method == "dora"

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` (see ``to_peft_dict``). An adapter whose init changed the base (PiSSA,
        OLoRA) is written as the plain LoRA of rank 2r its file tensors hold (``lora_init.ResidualLoRAUpdate``), with
        alpha scaled so that the scaling is unchanged, as PEFT's ``path_initial_model_for_weight_conversion``."""
        if self.changes_base:
            grow = math.sqrt(2) if self.use_rslora else 2.0
            plain = dataclasses.replace(self, r=2 * self.r, alpha=grow * self.alpha, init_weights=True,
                                        rank_pattern={}, alpha_pattern={})
            return plain.to_peft_dict(
                targets=list(layers),
                ranks={p: 2 * a.adapters[DEFAULT_ADAPTER].r for p, a in layers.items()},
                alphas={p: grow * a.adapters[DEFAULT_ADAPTER].alpha for p, a in layers.items()},
                fan_in_fan_out=any(a.kind.fan_in_fan_out for a in layers.values()),
                base_model_name_or_path=model_info.get("base_model_name_or_path"),
                task_type=model_info.get("task_type"),
                module_paths=module_paths,
            )
        return self.to_peft_dict(
            targets=list(layers),
            ranks={p: a.adapters[DEFAULT_ADAPTER].r for p, a in layers.items()},
            alphas={p: a.adapters[DEFAULT_ADAPTER].alpha for p, a in layers.items()},
            fan_in_fan_out=any(a.kind.fan_in_fan_out for a in layers.values()),
            base_model_name_or_path=model_info.get("base_model_name_or_path"),
            task_type=model_info.get("task_type"),
            module_paths=module_paths,
        )

    def to_peft_dict(self, targets: list[str], ranks: dict[str, int], alphas: dict[str, float],
                     fan_in_fan_out: bool, base_model_name_or_path: str | None, task_type: str | None,
                     module_paths: Iterable[str] = ()) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for exactly the modules we adapted.

        ``targets`` are the resolved module paths, so PEFT picks the same modules whatever our pattern syntax was
        (and whatever rule chose layers: no layer options are written); per-module ranks and alphas that differ from
        the default travel as fully qualified patterns. ``module_paths`` (every module of the model) lets a path
        that is also the tail of another path be written so that it matches only itself (see ``exact_targets``).
        """
        target_spec, key = exact_targets(targets, module_paths)
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "target_modules": target_spec,
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {key(k): v for k, v in sorted(ranks.items()) if v != self.r},
            "alpha_pattern": {key(k): v for k, v in sorted(alphas.items()) if v != self.alpha},
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "init_lora_weights": self.init_weights,
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoRAConfig":
        # Options that add tensors or change the forward pass (PEFT's LoRA variants): loading such an adapter as plain
        # LoRA would give wrong outputs without an error.
        for unsupported in ("modules_to_save", "layer_replication", "trainable_token_indices", "lora_bias",
                            "target_parameters", "use_qalora", "alora_invocation_tokens", "arrow_config",
                            "velora_config", "kasa_config", "monteclora_config", "use_bdlora"):
            if data.get(unsupported):
                raise ConfigError(f"PEFT adapter uses {unsupported}, which lightning_lora does not support yet.")
        if data.get("target_modules") is None:
            raise ConfigError(
                "PEFT config has no target_modules (PEFT then picks defaults per model type, which lightning_lora does "
                "not guess); set target_modules to the module names, e.g. ['q_proj', 'v_proj']."
            )
        if data.get("bias", "none") != "none":
            raise ConfigError(f"PEFT adapter trains biases (bias={data['bias']!r}); only bias='none' is supported.")
        init = data.get("init_lora_weights", True)
        if isinstance(init, str) and init.split("_")[0].lower() in ("pissa", "olora", "corda", "loftq", "mica"):
            raise ConfigError(
                f"PEFT adapter was initialized with init_lora_weights={init!r}, which changes the base weights or the "
                "forward pass; on the original base it would give wrong outputs. Convert it to plain LoRA in PEFT "
                "(save_pretrained with path_initial_model_for_weight_conversion) and load that."
            )
        return cls(
            method="dora" if data.get("use_dora") else "lora",
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            use_rslora=data.get("use_rslora", False),
            init_weights=init if init in (True, False, "gaussian") else True,
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
        )


@register_config
@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters: Houlsby et al. 2019 (arXiv 1902.00751) after attention and feed-forward sublayers,
    Pfeiffer et al. 2020 (arXiv 2005.00247) after the feed-forward sublayer only.

    Each adapter adds ``up(act(down(h)))`` where AdapterHub's adapters do (``methods/bottleneck.py``), with
    ``down: d -> d / reduction_factor`` and ``up`` zero-initialized, so the model's output is unchanged at step zero.
    With ``target_modules`` unset, the places are located in Llama-, GPT-2- and BERT-style models; for other models
    name the modules whose output the adapter follows.
    """

    method: str = "houlsby"
    reduction_factor: int = 16
    nonlinearity: str = "relu"

    METHODS: ClassVar[tuple[str, ...]] = ("houlsby", "pfeiffer")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.reduction_factor) or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor must be an integer >= 1 such as 16, {_got(self.reduction_factor)}.")
        self.reduction_factor = int(self.reduction_factor)
        if not isinstance(self.nonlinearity, str):
            raise ConfigError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, {_got(self.nonlinearity)}.")
        if self.nonlinearity not in NONLINEARITIES:
            raise ConfigError(
                f"nonlinearity {self.nonlinearity!r} is unknown.{_closest(self.nonlinearity, list(NONLINEARITIES))} "
                f"Choose one of {', '.join(NONLINEARITIES)}."
            )


def exact_targets(targets: list[str], module_paths: Iterable[str] = ()) -> tuple[TargetSpec, Callable[[str], str]]:
    """``target_modules`` and a rank/alpha pattern key maker that select exactly ``targets`` under PEFT's rules.

    PEFT (and we) take a listed name to match a path equal to it or ending in ``"." + name``, and a pattern key to
    match the end of a path at a dot. A full path that is also the tail of another module's path (``layers.0.fc``
    beside ``model.layers.0.fc``) would then pick both; only then are targets written as one anchored regex (PEFT
    matches a string with ``re.fullmatch``) and such keys anchored with ``^``. Otherwise the readable sorted list.
    """
    tails: set[str] = set()
    for path in {*module_paths, *targets}:
        parts = path.split(".")
        tails.update(".".join(parts[i:]) for i in range(1, len(parts)))
    ambiguous = {t for t in targets if t in tails}
    if not ambiguous:
        return sorted(targets), lambda path: path
    spec = "|".join(re.escape(t) for t in sorted(targets))
    return spec, lambda path: f"^{re.escape(path)}" if path in ambiguous else path


def _load_methods() -> None:
    """Import every method module, so that each has registered its config class."""
    importlib.import_module("lightning_lora.methods.registry")


def method_option_names() -> list[str]:
    """Every option of every method, in a stable order (``LoRACallback`` takes each as a keyword argument)."""
    _load_methods()
    names: dict[str, None] = {}
    for cls in CONFIG_CLASSES.values():
        names.update((n, None) for n in cls.option_names() if n != "method")
    return list(names)


def peft_config_class_for(peft_type: Any) -> type[AdapterConfig]:
    """The config class that reads PEFT configs of ``peft_type``; others are an error listing the supported ones."""
    _load_methods()
    by_type = {cls.PEFT_TYPE: cls for cls in CONFIG_CLASSES.values() if cls.PEFT_TYPE}
    if peft_type not in by_type:
        raise ConfigError(
            f"PEFT method {peft_type!r} is not supported; supported PEFT types: {', '.join(sorted(by_type))}."
        )
    return by_type[peft_type]


def config_class_for(method: str) -> type[AdapterConfig]:
    """The config class that implements ``method``; an unknown method lists the known ones."""
    _load_methods()
    if not isinstance(method, str):
        raise ConfigError(f"method must be a method name such as 'lora', {_got(method)}. Known methods: "
                          f"{', '.join(CONFIG_CLASSES)}.")
    try:
        return CONFIG_CLASSES[method]
    except KeyError:
        raise ConfigError(
            f"Unknown method {method!r}.{_closest(str(method), list(CONFIG_CLASSES))} "
            f"Known methods: {', '.join(CONFIG_CLASSES)}."
        ) from None


def as_adapter_config(obj: Any, model: Any = None) -> AdapterConfig:
    """The ``AdapterConfig`` that ``inject``/``prepare`` were given, built from what users pass in practice.

    Accepted: an ``AdapterConfig``; a dict of options with a ``"method"`` key (as for ``AdapterConfig.create``) or a
    ``"peft_type"`` key (PEFT's ``adapter_config.json``); a ``peft.LoraConfig`` (through its ``to_dict``, so PEFT
    options we do not support are refused by name). Anything else is a ``TypeError`` saying how to build a config.
    ``model``, when given, must be a module (catches swapped arguments before anything else fails obscurely).
    """
    if model is not None and not callable(getattr(model, "named_modules", None)):
        raise TypeError(f"Expected a torch.nn.Module to adapt, got {type(model).__name__}; call inject(model, config).")
    if isinstance(obj, AdapterConfig):
        return obj
    if isinstance(obj, Mapping):
        if "peft_type" in obj:
            return AdapterConfig.from_dict(dict(obj))
        if "method" in obj:
            return AdapterConfig.create(**obj)
        raise ConfigError(
            f"A dict of options needs a 'method' key (e.g. {{'method': 'lora', 'r': 8}}), got keys {sorted(map(str, obj))}. "
            "Or build the config explicitly: AdapterConfig.create('lora', r=8, target_modules=['q_proj', 'v_proj'])."
        )
    if type(obj).__module__.split(".")[0] == "peft" and callable(getattr(obj, "to_dict", None)):
        data = dict(obj.to_dict())
        init = data.get("init_lora_weights", True)
        # a file's weights replace init; a new adapter's do not: PiSSA/OLoRA start here from the base weight
        if isinstance(init, str) and init.startswith(("pissa", "olora")) and data.get("peft_type") == "LORA":
            config = AdapterConfig.from_dict({**data, "init_lora_weights": True})
            return dataclasses.replace(config, init_weights=init)
        if not (isinstance(init, bool) or init == "gaussian"):
            raise ConfigError(
                f"{type(obj).__name__}(init_lora_weights={init!r}) is not supported for new adapters; use True "
                "(PEFT's default), False, 'gaussian', 'pissa', 'pissa_niter_<n>' or 'olora'."
            )
        return AdapterConfig.from_dict(data)
    raise TypeError(
        f"Expected an AdapterConfig, got {type(obj).__name__} ({obj!r:.60}). Build one with "
        "AdapterConfig.create('lora', r=8, target_modules=['q_proj', 'v_proj']), or pass a dict of those options "
        "with a 'method' key, or a peft.LoraConfig."
    )
