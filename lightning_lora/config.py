"""Adapter configuration: one validated dataclass per method family, with a JSON round trip.

LoRA-family configs read and write PEFT's ``adapter_config.json`` vocabulary (``lora_alpha``, ``use_dora``, ...), so
an adapter we export loads in PEFT and one PEFT wrote loads here. Methods PEFT lacks use our own keys, tagged by
``"method"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

TargetSpec = Union[str, list[str], None]

NONLINEARITIES = ("relu", "gelu", "silu", "swish", "tanh")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the problem and the fix."""


def _closest(word: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""


@dataclass
class AdapterConfig:
    """What every method shares: its name and which modules it attaches to.

    ``target_modules`` follows PEFT: a list of names matches a module whose dotted path equals a name or ends with
    ``"." + name``; a string is a regular expression that must match the whole path; ``"all-linear"`` picks every
    linear layer except the output head. ``exclude_modules`` uses the same rules to drop matches.
    ``layers_to_transform`` keeps only modules in the given layer indexes, found by ``layers_pattern`` (for example
    ``"layers"``) or by the first ``.<name>.<index>.`` in the path.
    """

    method: str = ""
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    layers_to_transform: Union[int, list[int], None] = None
    layers_pattern: Union[str, list[str], None] = None

    METHODS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.method not in self.METHODS:
            raise ConfigError(
                f"{type(self).__name__} does not implement method {self.method!r}; it implements "
                f"{', '.join(self.METHODS)}."
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set)):
                setattr(self, name, sorted(value) if isinstance(value, set) else list(value))
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                raise ConfigError(f"{name} must be a list of module names or a regex string, not {type(value).__name__}.")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and any(i < 0 for i in self.layers_to_transform):
            raise ConfigError(f"layers_to_transform holds a negative index: {self.layers_to_transform}.")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Our JSON form: every field, tagged by ``method``."""
        return dataclasses.asdict(self)

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
        if "peft_type" in data:
            return LoRAConfig.from_peft_dict(data)
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


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA (Hu et al. 2021, arXiv 2106.09685) and DoRA (Liu et al. 2024, arXiv 2402.09353).

    The update is ``(alpha / r) * B A`` (rsLoRA, arXiv 2312.03732: ``alpha / sqrt(r)``). ``init_weights`` is
    ``True`` (A Kaiming-uniform, B zero: PEFT's default), ``"gaussian"`` (A normal with std 1/r, B zero) or
    ``False`` (both random: the adapter changes the output from the start; for tests).
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

    METHODS: ClassVar[tuple[str, ...]] = ("lora", "dora")

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = "all-linear"
        super().__post_init__()
        for name, rank in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {rank!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.init_weights not in (True, False, "gaussian"):
            raise ConfigError(f"init_weights must be True, False or 'gaussian', got {self.init_weights!r}.")
        if not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be finite, got {self.alpha}.")

    @property
    def use_dora(self) -> bool:
        return self.method == "dora"

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_peft_dict(self, targets: list[str], ranks: dict[str, int], alphas: dict[str, float],
                     fan_in_fan_out: bool, base_model_name_or_path: str | None, task_type: str | None) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for exactly the modules we adapted.

        ``targets`` are the resolved module paths, so PEFT picks the same modules whatever our pattern syntax was;
        per-module ranks and alphas that differ from the default travel as fully qualified patterns.
        """
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "target_modules": sorted(targets),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {k: v for k, v in sorted(ranks.items()) if v != self.r},
            "alpha_pattern": {k: v for k, v in sorted(alphas.items()) if v != self.alpha},
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "init_lora_weights": self.init_weights,
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoRAConfig":
        if data["peft_type"] != "LORA":
            raise ConfigError(
                f"PEFT method {data['peft_type']!r} is not supported yet; supported: LORA (with or without use_dora)."
            )
        # Options that add tensors or change the forward pass (PEFT's LoRA variants): loading such an adapter as plain
        # LoRA would give wrong outputs without an error.
        for unsupported in ("modules_to_save", "layer_replication", "trainable_token_indices", "lora_bias",
                            "target_parameters", "use_qalora", "alora_invocation_tokens", "arrow_config",
                            "velora_config", "kasa_config", "monteclora_config", "use_bdlora"):
            if data.get(unsupported):
                raise ConfigError(f"PEFT adapter uses {unsupported}, which lightning_lora does not support yet.")
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


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters: Houlsby et al. 2019 (arXiv 1902.00751) after attention and feed-forward sublayers,
    Pfeiffer et al. 2020 (arXiv 2005.00247) after the feed-forward sublayer only.

    Each adapter is ``h + up(act(down(h)))`` with ``down: d -> d / reduction_factor`` and ``up`` zero-initialized, so
    the model's output is unchanged at step zero. With ``target_modules`` unset, the sublayer outputs are located
    in Llama-, GPT-2- and BERT-style models; for other models name the modules whose output the adapter follows.
    """

    method: str = "houlsby"
    reduction_factor: int = 16
    nonlinearity: str = "relu"

    METHODS: ClassVar[tuple[str, ...]] = ("houlsby", "pfeiffer")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor must be an integer >= 1, got {self.reduction_factor!r}.")
        if self.nonlinearity not in NONLINEARITIES:
            raise ConfigError(
                f"nonlinearity {self.nonlinearity!r} is unknown.{_closest(self.nonlinearity, list(NONLINEARITIES))} "
                f"Choose one of {', '.join(NONLINEARITIES)}."
            )


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    method: cls for cls in (LoRAConfig, BottleneckConfig) for method in cls.METHODS
}


def config_class_for(method: str) -> type[AdapterConfig]:
    """The config class that implements ``method``; an unknown method lists the known ones."""
    try:
        return CONFIG_CLASSES[method]
    except KeyError:
        raise ConfigError(
            f"Unknown method {method!r}.{_closest(str(method), list(CONFIG_CLASSES))} "
            f"Known methods: {', '.join(CONFIG_CLASSES)}."
        ) from None
