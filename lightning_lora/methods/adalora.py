"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): W = W0 + alpha / r0 * P diag(E) Q, with a rank budget that shrinks.

Each layer starts with ``init_r`` triplets (a column of P, a value of E, a row of Q; PEFT's ``lora_B``, ``lora_E``,
``lora_A``); ``r0`` (PEFT's ``ranknum``) stays ``init_r``. After each optimizer step, ``allocate`` scores every triplet
by the smoothed sensitivity ``|p * grad|`` times its uncertainty (the paper's eq. 8-11, as PEFT's ``RankAllocator``)
and zeroes E for the least important ones until the whole model fits the budget, which falls on PEFT's cubic schedule
from the sum of initial ranks to ``target_r`` per layer between steps ``tinit`` and ``total_step - tfinal``.
``orthogonality_loss`` keeps P and Q near orthogonal (``||Q Q^T - I|| + ||P^T P - I||``, averaged, times
``orth_reg_weight``). Both run from the training loop through ``MethodSpec.regularization``/``after_step``.

The importance statistics and the rank mask are buffers (checkpoints resume them). An adapter file keeps only the
surviving triplets, with PEFT's ``rank_pattern`` (``{"<path>.lora_E": [kept, ...]}``), so it loads in PEFT. Unlike
PEFT, a masked triplet stays at zero during the final ``tfinal`` steps (PEFT lets it regrow and then drops it from its
file), so the exported adapter equals the trained one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import (ALL_LINEAR, AdapterConfig, ConfigError, _got, _is_int, _is_real, _positive_int, _positive_real,
                      _probability, exact_targets, register_config)
from .base import AdaptedLayer, WeightUpdate, base_kind

TRIPLET = ("lora_A", "lora_E", "lora_B")  # Q, E, P in the paper's names; the rank is dim 0 of A and E, dim 1 of B


@register_config
@dataclass
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA's options, with PEFT's ``AdaLoraConfig`` names and defaults (``alpha`` is PEFT's ``lora_alpha``).
    ``total_step`` None takes the Trainer's estimated number of optimizer steps. ``kept_triplets`` (PEFT's
    ``rank_pattern``) is the triplets each layer kept (``{"<path>.lora_E": [true, false, ...]}``), written by exports
    and read back from them."""

    method: str = "adalora"
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    kept_triplets: Optional[dict[str, list[bool]]] = None

    METHODS: ClassVar[tuple[str, ...]] = ("adalora",)
    PEFT_TYPE: ClassVar[Optional[str]] = "ADALORA"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            self.target_modules = ALL_LINEAR
        super().__post_init__()
        self.init_r, self.target_r = _positive_int("init_r", self.init_r), _positive_int("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} is above init_r={self.init_r}: AdaLoRA only removes ranks; "
                              "lower target_r or raise init_r.")
        self.alpha, self.deltaT = _positive_real("alpha", self.alpha), _positive_int("deltaT", self.deltaT)
        for name in ("tinit", "tfinal"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a number of steps >= 0 such as 100, {_got(getattr(self, name))}.")
        for name in ("beta1", "beta2"):
            if not _is_real(getattr(self, name)) or not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an EMA factor in (0, 1) such as 0.85, {_got(getattr(self, name))}.")
        self.dropout = _probability("dropout", self.dropout)
        if not _is_real(self.orth_reg_weight) or not 0 <= self.orth_reg_weight < math.inf:
            raise ConfigError(f"orth_reg_weight must be a number >= 0 such as 0.5, {_got(self.orth_reg_weight)}.")
        if self.total_step is not None:
            self.total_step = _positive_int("total_step", self.total_step)
            check_schedule(self.tinit, self.tfinal, self.total_step)
        if self.kept_triplets is not None and not isinstance(self.kept_triplets, Mapping):
            raise ConfigError(f"kept_triplets must map '<path>.lora_E' to a list of booleans, {_got(self.kept_triplets)}.")

    def file_dict(self, layers: Mapping[str, Any], module_paths: Iterable[str], model_info: Mapping[str, Any]) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` of an AdaLoRA adapter, with the final ranks as ``rank_pattern``."""
        target_spec, _ = exact_targets(list(layers), module_paths)
        updates = {p: a.adapters[next(iter(a.adapters))] for p, a in layers.items()}
        total = self.total_step or max((int(u.planned_steps) for u in updates.values()), default=0)
        return {
            "peft_type": "ADALORA", "task_type": model_info.get("task_type"),
            "base_model_name_or_path": model_info.get("base_model_name_or_path"),
            "init_r": self.init_r, "target_r": self.target_r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": max(total, self.tinit + self.tfinal + 1),  # PEFT refuses a file without a valid schedule
            "target_modules": target_spec, "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None, "fan_in_fan_out": any(a.kind.fan_in_fan_out for a in layers.values()),
            "rank_pattern": {f"{p}.lora_E": u.kept().tolist() for p, u in sorted(updates.items())},
            "bias": "none", "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> AdaLoRAConfig:
        if data.get("target_modules") is None:
            raise ConfigError("PEFT AdaLoRA config has no target_modules; set them to the module names.")
        renamed = {"alpha": "lora_alpha", "dropout": "lora_dropout", "kept_triplets": "rank_pattern"}
        options = {name: data.get(renamed.get(name, name)) for name in cls.option_names() if name != "method"}
        return cls(**{name: value for name, value in options.items() if value is not None})


def check_schedule(tinit: int, tfinal: int, total_step: float) -> None:
    if tinit >= total_step - tfinal:
        raise ConfigError(f"AdaLoRA's schedule leaves no budgeting phase: tinit={tinit} >= total_step={total_step} - "
                          f"tfinal={tfinal}. Lower tinit/tfinal or raise total_step (or train for more steps).")


class AdaLoRAUpdate(WeightUpdate):
    """AdaLoRA on ``nn.Linear``/``Conv1D``: ``out += alpha / r0 * B diag(E) A dropout(x)``; on ``nn.Conv*d`` (PEFT:
    Conv2d) A spans the whole receptive field and the update runs as one convolution by ``B diag(E) A``, reshaped."""

    def __init__(self, base_layer: nn.Module, config: AdaLoRAConfig, r: int) -> None:
        super().__init__(config)
        in_features, out_features = fan_in_out(base_layer)
        self.conv = base_kind(base_layer).family == "conv"
        kw = {"device": base_layer.weight.device, "dtype": torch.float32 if base_layer.weight.dtype not in
              (torch.float32, torch.float64) else base_layer.weight.dtype}
        # alpha / (r0 + 1e-5) as PEFT computes it, a Python float: reading the ranknum tensor in forward would
        # break torch.compile graphs
        self.r, self.scaling = r, config.alpha / (config.init_r + 1e-5)
        self.file_pattern: Optional[list[bool]] = None  # the rank_pattern entry this update was built from
        self.lora_A = nn.Parameter(torch.randn(r, in_features, **kw) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(out_features, r, **kw) * 0.02)
        self.register_buffer("ranknum", torch.tensor(float(config.init_r), **kw), persistent=False)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=kw["device"]))
        # the schedule's length when total_step is None (the first run's planned steps; a resumed run keeps it)
        self.register_buffer("planned_steps", torch.zeros((), dtype=torch.long, device=kw["device"]))
        for name in TRIPLET:  # PEFT's RankAllocator.exp_avg_ipt and exp_avg_unc, per tensor
            self.register_buffer(f"{name}_ipt", torch.zeros_like(getattr(self, name)))
            self.register_buffer(f"{name}_unc", torch.zeros_like(getattr(self, name)))

    def forward(self, layer: AdaptedLayer, x: Tensor, out: Tensor) -> Tensor:
        dtype = out.dtype
        if self.conv:
            delta = self.delta_weight(layer).to(dtype)
            return out + layer.original_module._conv_forward(self.lora_dropout(x).to(dtype), delta, None)
        after_a = F.linear(self.lora_dropout(x).to(dtype), (self.lora_A * self.lora_E).to(dtype))
        return out.addmm_(after_a, self.lora_B.to(dtype).t(), alpha=self.scaling)

    def delta_weight(self, layer: AdaptedLayer) -> Tensor:
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling
        return delta.reshape(layer.weight.shape) if self.conv else delta

    def kept(self) -> Tensor:
        """Which of the ``init_r`` triplets survive (PEFT's ``rank_pattern`` entry); an update loaded from a file
        holds only the triplets its pattern kept."""
        if self.file_pattern is None:
            return self.rank_mask.cpu()
        kept = torch.tensor(self.file_pattern, dtype=torch.bool)
        kept[kept.clone()] = self.rank_mask.cpu()
        return kept

    def file_tensors(self) -> dict[str, Tensor]:
        """The kept triplets only (PEFT's ``resize_state_dict_by_rank_pattern``); no statistics."""
        keep = self.rank_mask
        if bool(keep.all()):
            return {name: getattr(self, name) for name in TRIPLET}
        return {"lora_A": self.lora_A[keep], "lora_E": self.lora_E[keep], "lora_B": self.lora_B[:, keep]}

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """One step of the smoothed sensitivity and uncertainty of every entry (eq. 8-9)."""
        for name in TRIPLET:
            param = getattr(self, name)
            if param.grad is None:
                continue
            ipt = (param * param.grad).abs()
            avg, unc = getattr(self, f"{name}_ipt"), getattr(self, f"{name}_unc")
            avg.mul_(beta1).add_(ipt, alpha=1 - beta1)
            unc.mul_(beta2).add_((ipt - avg).abs(), alpha=1 - beta2)

    def triplet_scores(self) -> Tensor:
        """Each triplet's importance (eq. 10-11): E's score plus the mean scores of its row of A and column of B."""
        score = {name: getattr(self, f"{name}_ipt") * getattr(self, f"{name}_unc") for name in TRIPLET}
        return score["lora_E"].view(-1) + score["lora_A"].mean(1) + score["lora_B"].mean(0)

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.rank_mask[:, None], 0.0)


def budget(step: int, init_budget: int, target_budget: int, config: AdaLoRAConfig, total: int) -> tuple[int, bool]:
    """(budget, whether to mask now) at ``step``: PEFT's ``RankAllocator.budget_schedule`` (cubic decrease)."""
    if step <= config.tinit:
        return init_budget, False
    if step > total - config.tfinal:
        return target_budget, True
    progress = 1 - (step - config.tinit) / (total - config.tfinal - config.tinit)
    return int((init_budget - target_budget) * progress ** 3 + target_budget), step % config.deltaT == 0


def _updates(adapters: dict[str, nn.Module]) -> list[AdaLoRAUpdate]:
    return [u for a in adapters.values() if isinstance(a, AdaptedLayer) for u in a.adapters.values()
            if isinstance(u, AdaLoRAUpdate)]


def allocate(adapters: dict[str, nn.Module], step: int, planned_steps: float) -> Optional[int]:
    """After optimizer step ``step``: update the importance scores and, on schedule, mask the least important triplets
    of the whole model down to the budget (PEFT's ``AdaLoraModel.update_and_allocate``). Returns the budget."""
    updates = _updates(adapters)
    if not updates:
        return None
    config = updates[0].config
    total = config.total_step or int(updates[0].planned_steps) or planned_steps
    if not math.isfinite(total):
        raise ConfigError("AdaLoRA needs the number of training steps: set total_step, or max_steps/max_epochs.")
    total = int(total)
    check_schedule(config.tinit, config.tfinal, total)
    for update in updates:
        update.planned_steps.fill_(total)
    end = total - config.tfinal
    if step > end:  # the final phase: the allocation is fixed, masked triplets stay at zero
        for update in updates:
            update.apply_mask()
        return config.target_r * len(updates)
    if step < end:
        for update in updates:
            update.update_importance(config.beta1, config.beta2)
    init_budget = sum(u.r for u in updates)
    current, mask_now = budget(step, init_budget, config.target_r * len(updates), config, total)
    if (mask_now or step == end) and init_budget > current:
        scores = [u.triplet_scores() for u in updates]
        threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores]), init_budget - current)[0].item()
        for update, score in zip(updates, scores):
            update.rank_mask.copy_(score > threshold)
            update.apply_mask()
    return current


def orthogonality_loss(adapters: dict[str, nn.Module]) -> Optional[Tensor]:
    """``orth_reg_weight`` times the mean of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` over every A and B."""
    updates = _updates(adapters)
    if not updates or updates[0].config.orth_reg_weight == 0:
        return None
    terms = []
    for update in updates:
        for cov in (update.lora_A @ update.lora_A.T, update.lora_B.T @ update.lora_B):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return updates[0].config.orth_reg_weight * torch.stack(terms).mean()


def build_adalora(base_layer: nn.Module, config: AdaLoRAConfig, path: str) -> AdaLoRAUpdate:
    """The update for ``path``: ``init_r`` triplets, or as many as the config's ``kept_triplets`` kept (a file)."""
    kept = (config.kept_triplets or {}).get(f"{path}.lora_E")
    r = config.init_r if kept is None else int(sum(bool(k) for k in kept))
    if getattr(base_layer, "groups", 1) != 1:
        raise ConfigError(f"AdaLoRA on grouped convolutions ({path}: groups={base_layer.groups}) is not supported; "
                          "leave it out with exclude_modules.")
    in_features, out_features = fan_in_out(base_layer)
    if config.init_r > min(in_features, out_features):
        raise ConfigError(f"init_r={config.init_r} is larger than {path} allows (its shape is {in_features} -> "
                          f"{out_features}); lower init_r.")
    update = AdaLoRAUpdate(base_layer, config, r)
    update.file_pattern = None if kept is None else [bool(k) for k in kept]
    return update


def fan_in_out(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of the weight as a matrix: a convolution's inputs are its whole receptive field."""
    in_features, out_features = base_kind(layer).dims(layer)
    return in_features * math.prod(getattr(layer, "kernel_size", ())), out_features


def supports_adalora(module: nn.Module) -> bool:
    kind = base_kind(module)
    return kind is not None and kind.family in ("linear", "conv")
