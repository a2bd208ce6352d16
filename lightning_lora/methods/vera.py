"""VeRA (Kopiczko et al. 2024, arXiv 2310.11454): h = W0 x + Lambda_b B Lambda_d A x.

A (r, in) and B (out, r) are random, frozen and shared by every adapted layer; each layer trains only the diagonals
``vera_lambda_d`` (r) and ``vera_lambda_b`` (out). As in PEFT there is one pair per adapter, sized for the largest
targeted layer, that each layer slices (``A[:, :in]``, ``B[:out, :]``). It is drawn from ``projection_prng_key`` by
PEFT's Kaiming-uniform recipe, so the same key gives PEFT's matrices bit for bit; with ``save_projection`` the adapter
file stores it once, as PEFT does (``base_model.vera_A``, ``base_model.vera_B``), else a load regenerates it.
Checkpoints never hold it: injection regenerates it. lambda_b starts at zero, lambda_d at ``d_initial``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import (ALL_LINEAR, AdapterConfig, ConfigError, _boolean, _got, _is_int, _positive_int, _positive_real,
                      _probability, exact_targets, register_config)
from .base import AdaptedLayer, WeightUpdate, base_kind
from .lora import factory  # device and float32-over-half dtype of adapter tensors


@register_config
@dataclass
class VeRAConfig(AdapterConfig):
    """VeRA options in PEFT's ``VeraConfig`` terms: ``r`` (the shared projections' rank; VeRA's parameters grow with
    out + r per layer, so far higher ranks than LoRA's are usual: PEFT's default 256), ``dropout`` (PEFT's
    ``vera_dropout``, on the adapter's input), ``d_initial``, ``projection_prng_key``, ``save_projection`` and
    ``init_weights`` (False: lambda_b starts at one and lambda_d random, for tests). With no ``target_modules``,
    every linear layer but the output head."""

    method: str = "vera"
    r: int = 256
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True
    init_weights: bool = True

    METHODS: ClassVar[tuple[str, ...]] = ("vera",)
    PEFT_TYPE: ClassVar[Optional[str]] = "VERA"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        super().__post_init__()
        self.r = _positive_int("r", self.r)
        self.dropout = _probability("dropout", self.dropout)
        self.d_initial = _positive_real("d_initial", self.d_initial)
        if not _is_int(self.projection_prng_key) or not 0 <= self.projection_prng_key < 2**63:
            raise ConfigError(f"projection_prng_key must be a non-negative integer seed such as 0, "
                              f"{_got(self.projection_prng_key)}.")
        self.projection_prng_key = int(self.projection_prng_key)
        self.save_projection = _boolean("save_projection", self.save_projection)
        self.init_weights = _boolean("init_weights", self.init_weights)

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for exactly the adapted paths (so PEFT sizes the projections the same)."""
        return {"peft_type": self.PEFT_TYPE, **model_info, "r": self.r,
                "target_modules": exact_targets(list(layers), module_paths)[0],
                "projection_prng_key": self.projection_prng_key, "save_projection": self.save_projection,
                "vera_dropout": self.dropout, "d_initial": self.d_initial, "init_weights": self.init_weights,
                "fan_in_fan_out": any(layer.kind.fan_in_fan_out for layer in layers.values()), "bias": "none",
                "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None, "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "VeRAConfig":
        for unsupported in ("modules_to_save",):
            if data.get(unsupported):
                raise ConfigError(f"PEFT adapter uses {unsupported}, which lightning_lora does not support yet.")
        if data.get("bias", "none") != "none":
            raise ConfigError(f"PEFT adapter trains biases (bias={data['bias']!r}); only bias='none' is supported.")
        if data.get("target_modules") is None:
            raise ConfigError("PEFT config has no target_modules; set them to the module names, e.g. ['q_proj'].")
        renamed = {"vera_dropout": "dropout"}
        options = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "r", "vera_dropout",
                   "d_initial", "projection_prng_key", "save_projection", "init_weights")
        return cls(**{renamed.get(k, k): data[k] for k in options if data.get(k) is not None})


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """PEFT's ``_kaiming_init``: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen random ``vera_A`` (r, in) and ``vera_B`` (out, r) one adapter's layers share (as one submodule
    object, so ``.to()`` and ``deepcopy`` keep them shared). Non-persistent: regenerated from the key, never
    checkpointed; float32 over a half-precision model."""

    def __init__(self, r: int, in_features: int, out_features: int, key: int, **factory_kwargs: Any) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(key)
        a = kaiming_uniform((r, in_features), generator)  # drawn before B, as in PEFT
        b = kaiming_uniform((out_features, r), generator)
        self.register_buffer("vera_A", a.to(**factory_kwargs), persistent=False)
        self.register_buffer("vera_B", b.to(**factory_kwargs), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> "VeRAProjections":
        """A cast to half precision moves the projections but keeps them float32, as adapter weights over a half base
        stay (``lora.adapter_dtype``): rounded, they would no longer be what ``projection_prng_key`` regenerates."""
        target = fn(torch.zeros(0, device=self.vera_A.device))
        if target.dtype in (torch.float16, torch.bfloat16):
            fn = lambda t: t.to(target.device)  # noqa: E731
        return super()._apply(fn, recurse)


def vera_projections(targets: list[nn.Module], config: VeRAConfig) -> VeRAProjections:
    """The projections for ``targets``: as wide as the widest input and as tall as the tallest output among them."""
    dims = [base_kind(m).dims(m) for m in targets]
    return VeRAProjections(config.r, max(d[0] for d in dims), max(d[1] for d in dims), config.projection_prng_key,
                           **factory(targets[0]))


class VeRAUpdate(WeightUpdate):
    """VeRA on ``nn.Linear`` and ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, config: VeRAConfig, projections: VeRAProjections) -> None:
        super().__init__(config)
        self.in_features, self.out_features = base_kind(base_layer).dims(base_layer)
        self.r = config.r
        self.projections = projections
        self.vera_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.vera_lambda_b = nn.Parameter(torch.ones(self.out_features, **factory(base_layer)))
        self.vera_lambda_d = nn.Parameter(torch.randn(self.r, **factory(base_layer)))
        if config.init_weights:
            with torch.no_grad():
                self.vera_lambda_b.zero_()
                self.vera_lambda_d.fill_(config.d_initial)

    def sliced(self) -> tuple[Tensor, Tensor]:
        """This layer's A (r, in) and B (out, r): the top-left corners of the shared matrices."""
        return self.projections.vera_A[:, : self.in_features], self.projections.vera_B[: self.out_features, :]

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        """``out + lambda_b * B (lambda_d * A dropout(x))`` on 2-D ``x``/``out``."""
        dtype = out.dtype
        a, b = self.sliced()
        after_a = F.linear(self.vera_dropout(x).to(dtype), a.to(dtype)) * self.vera_lambda_d.to(dtype)
        return out + F.linear(after_a, b.to(dtype)) * self.vera_lambda_b.to(dtype)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        a, b = self.sliced()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def shared_tensors(self) -> dict[str, Tensor]:
        return {"vera_A": self.projections.vera_A, "vera_B": self.projections.vera_B} if self.config.save_projection else {}


def build_vera(base_layer: nn.Module, config: VeRAConfig, path: str, shared: VeRAProjections) -> VeRAUpdate:
    return VeRAUpdate(base_layer, config, shared)


def supports_vera(module: nn.Module) -> bool:
    """``nn.Linear`` and ``Conv1D``, as in PEFT."""
    kind = base_kind(module)
    return kind is not None and kind.family == "linear"
