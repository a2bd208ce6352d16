"""``LoRACallback``: add it to a ``Trainer`` and the model trains an adapter instead of its weights.

Lightning calls, in ``fit``: ``Callback.setup`` -> ``LightningModule.setup`` -> ``configure_model`` -> checkpoint restore
-> ``strategy.setup`` (precision, DDP/FSDP wrapping, optimizers) -> ``on_fit_start``. Adapters must exist before the
restore and the optimizers, so they are injected in ``setup``, or right after ``configure_model`` for models that
build their layers there.
"""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Any, Optional, Union

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
import torch
from torch import nn
from typing_extensions import override

from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.export import export_merged
from lightning_lora.fingerprint import base_fingerprint
from lightning_lora.io import find_hf_model, save_adapter
from lightning_lora.methods.registry import method_spec
from lightning_lora.surgery import (
    adapter_parameters,
    adapters,
    enable_input_grads_for_checkpointing,
    freeze_base,
    inject,
    injected_config,
    parameter_counts,
)

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "lightning_lora"


class LoRACallback(Callback):
    """Inject a parameter-efficient adapter into the LightningModule's model and train only the adapter.

    Args:
        method: ``"lora"``, ``"dora"``, ``"houlsby"`` or ``"pfeiffer"``.
        r, alpha, dropout, use_rslora, init_weights, rank_pattern, alpha_pattern: LoRA/DoRA options
            (see ``LoRAConfig``); None keeps the method's default.
        target_modules, exclude_modules, layers_to_transform, layers_pattern: which modules to adapt, with PEFT's
            matching rules; LoRA defaults to ``"all-linear"``, bottleneck adapters locate their sublayers.
        reduction_factor, nonlinearity: bottleneck adapter options (see ``BottleneckConfig``).
        model_attr: dotted path of the module to adapt inside the LightningModule. None finds the one Hugging Face
            ``PreTrainedModel`` in it, else adapts the LightningModule itself.
        export_dir: where exports go; None is ``<trainer.log_dir or default_root_dir>/lightning_lora``.
        export_merged: also write the merged model (with the LightningModule's ``tokenizer``, if it has one, so the
            directory is a standalone model). None means yes for methods that can merge.
        export_on_checkpoint: export at every checkpoint too (into ``export_dir/step-<N>``), not only at fit end.
        seed: seed of the adapter's initialization, drawn in a forked RNG so the run's random stream is untouched;
            None uses ``torch.initial_seed()`` (what ``seed_everything`` sets), so every rank and strategy agree.
    """

    def __init__(
        self,
        method: str = "lora",
        *,
        r: Optional[int] = None,
        alpha: Optional[float] = None,
        dropout: Optional[float] = None,
        target_modules: Union[str, list[str], None] = None,
        exclude_modules: Union[str, list[str], None] = None,
        layers_to_transform: Union[int, list[int], None] = None,
        layers_pattern: Union[str, list[str], None] = None,
        rank_pattern: Optional[dict[str, int]] = None,
        alpha_pattern: Optional[dict[str, float]] = None,
        use_rslora: Optional[bool] = None,
        init_weights: Union[bool, str, None] = None,
        reduction_factor: Optional[int] = None,
        nonlinearity: Optional[str] = None,
        model_attr: Optional[str] = None,
        export_dir: Optional[str] = None,
        export_merged: Optional[bool] = None,
        export_on_checkpoint: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        options = dict(
            r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, exclude_modules=exclude_modules,
            layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern, use_rslora=use_rslora, init_weights=init_weights,
            reduction_factor=reduction_factor, nonlinearity=nonlinearity,
        )
        self.config = AdapterConfig.create(method, **{k: v for k, v in options.items() if v is not None})
        mergeable = method_spec(method).mergeable
        if export_merged and not mergeable:
            raise ConfigError(
                f"{method!r} adapters are inserted modules and cannot be merged into the base weights; set "
                "export_merged=False (the standalone adapter export is still written)."
            )
        self.model_attr = model_attr
        self.export_dir = export_dir
        self.export_merged = mergeable if export_merged is None else export_merged
        self.export_on_checkpoint = export_on_checkpoint
        self.seed = seed
        self.adapter_dir: Optional[Path] = None
        self.merged_dir: Optional[Path] = None
        self._root: Optional[nn.Module] = None
        self._root_path = ""
        self._fingerprint: Optional[str] = None
        self._user_strict_loading: Optional[bool] = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.config.method)

    @property
    def model(self) -> nn.Module:
        """The adapted module (the Hugging Face model, or what ``model_attr`` names)."""
        if self._root is None:
            raise RuntimeError("LoRACallback has not set up a model yet; it does so when the Trainer starts.")
        return self._root

    # -- injection ---------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if is_overridden("configure_model", pl_module):
            _wrap_once(pl_module, "configure_model", after=lambda: self._inject(trainer, pl_module))
        else:
            self._inject(trainer, pl_module)
        _wrap_once(pl_module, "on_load_checkpoint", before=lambda checkpoint: self._check_checkpoint(pl_module, checkpoint))

    def _find_root(self, pl_module: pl.LightningModule) -> tuple[str, nn.Module]:
        if self.model_attr is not None:
            try:
                return self.model_attr, pl_module.get_submodule(self.model_attr)
            except AttributeError:
                names = [n for n, _ in pl_module.named_children()]
                raise ConfigError(
                    f"model_attr={self.model_attr!r} names no submodule of {type(pl_module).__name__}; its children "
                    f"are {names}."
                ) from None
        found = find_hf_model(pl_module)
        return found if found is not None else ("", pl_module)

    def _inject(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._root_path, root = self._find_root(pl_module)
        existing = injected_config(root)
        if existing is None:
            targets = inject(root, self.config, seed=self.seed if self.seed is not None else torch.initial_seed())
        elif existing.method != self.config.method:
            raise ConfigError(
                f"{type(root).__name__} already holds {existing.method!r} adapters but the callback asks for "
                f"{self.config.method!r}; unload them first or use method={existing.method!r}."
            )
        else:  # a second fit/test in the same process, or an adapter loaded by the user: train what is there
            freeze_base(root)
            targets = list(adapters(root))
        self._root = root
        self._fingerprint = base_fingerprint(root)
        if enable_input_grads_for_checkpointing(root):
            log.debug("lightning_lora: gradient checkpointing is on; input embeddings now require grad")
        # Checkpoints hold only the adapter: the base keys will be missing on restore, which on_load_checkpoint
        # checks exactly instead of Lightning's all-or-nothing strict loading.
        if self._user_strict_loading is None:
            self._user_strict_loading = pl_module.strict_loading
        pl_module.strict_loading = False
        trainable, total = parameter_counts(pl_module)
        where = self._root_path or "the LightningModule"
        rank_zero_info(
            f"lightning_lora: {self.config.method} on {len(targets)} modules of {type(root).__name__} ({where}); "
            f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Gradient checkpointing may have been switched on after setup (e.g. in on_fit_start).
        enable_input_grads_for_checkpointing(self.model)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Optimizers exist now; drop frozen base parameters a ``configure_optimizers(self.parameters())`` passed in,
        so that only adapter (and other trainable) parameters are optimized and checkpointed."""
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p.requires_grad]
        params = list(adapter_parameters(self.model))
        if not any(p.requires_grad for p in params):
            raise ConfigError("No adapter parameter requires grad; was requires_grad changed after injection?")
        half = {str(p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)}
        if half:
            rank_zero_warn(
                f"lightning_lora: adapter weights are {', '.join(sorted(half))} (the Trainer's precision cast every "
                "parameter), so small updates round away. Load the base model in bfloat16 yourself and use "
                "precision='bf16-mixed' or '32-true': adapters then train in float32 and still compute in bfloat16."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for hook in ("configure_model", "on_load_checkpoint"):
            pl_module.__dict__.pop(hook, None)
        if self._user_strict_loading is not None:
            pl_module.strict_loading = self._user_strict_loading
            self._user_strict_loading = None

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _frozen_keys(self, pl_module: pl.LightningModule) -> set[str]:
        prefix = f"{self._root_path}." if self._root_path else ""
        return {prefix + name for name, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def _identity(self) -> dict[str, Any]:
        return {"method": self.config.method, "config": self.config.to_dict(), "base_fingerprint": self._fingerprint,
                "model_attr": self._root_path, "targets": sorted(adapters(self.model))}

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        frozen = self._frozen_keys(pl_module)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k in frozen]:
            del state[key]
        checkpoint[CHECKPOINT_KEY] = {**self._identity(), "rng": _rng_state()}
        if self.export_on_checkpoint:
            self._export(trainer, self._export_root(trainer) / f"step-{trainer.global_step}")

    def _check_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Runs just before Lightning loads the checkpoint's state dict (non-strictly, since the frozen base is not in
        it): refuse a checkpoint of another adapter or base, and any mismatch beyond the missing base tensors, while
        the model is still untouched."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None:
            if saved["config"] != self.config.to_dict():
                raise ConfigError(
                    f"The checkpoint's adapter was trained with {saved['config']}, but this LoRACallback has "
                    f"{self.config.to_dict()}; resume with the same options."
                )
            if saved["base_fingerprint"] != self._fingerprint:
                raise ConfigError(
                    f"The checkpoint's adapter was trained on a different base model (fingerprint "
                    f"{saved['base_fingerprint']}, this model {self._fingerprint}); load the base it was trained on."
                )
        model_state = pl_module.state_dict()
        saved_state = checkpoint["state_dict"]
        missing = sorted(set(model_state) - set(saved_state) - self._frozen_keys(pl_module))
        unexpected = sorted(set(saved_state) - set(model_state))
        reshaped = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(model_state[k].shape)}"
                    for k, v in saved_state.items() if k in model_state and v.shape != model_state[k].shape]
        if reshaped or (self._user_strict_loading is not False and (missing or unexpected)):
            raise ConfigError(
                f"Checkpoint does not match the adapted model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                f", unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, other shapes {reshaped[:3]}. "
                "Was it written with other adapter options or another model?"
            )

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and "rng" in saved:
            # Lightning does not checkpoint RNG state, so a resumed run would draw other dropout masks than an
            # uninterrupted one. Restored here, before the fit loop creates its DataLoader iterator (which draws a
            # seed), the sequence of draws matches an uninterrupted run resumed at an epoch boundary.
            _set_rng_state(saved["rng"])

    # -- export ------------------------------------------------------------------------------------------------------
    def _export_root(self, trainer: pl.Trainer) -> Path:
        if self.export_dir is not None:
            return Path(self.export_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "lightning_lora"

    def _export(self, trainer: pl.Trainer, directory: Path) -> None:
        if trainer.is_global_zero:
            self.adapter_dir = save_adapter(self.model, directory / "adapter")
            if self.export_merged:
                tokenizer = getattr(trainer.lightning_module, "tokenizer", None)
                tokenizer = tokenizer if callable(getattr(tokenizer, "save_pretrained", None)) else None
                self.merged_dir = export_merged(self.model, directory / "merged", tokenizer=tokenizer)
        trainer.strategy.barrier("lightning_lora_export")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = self._export_root(trainer)
        self._export(trainer, directory)
        if trainer.is_global_zero:
            rank_zero_info(f"lightning_lora: adapter written to {self.adapter_dir}"
                           + (f", merged model to {self.merged_dir}" if self.merged_dir else ""))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _wrap_once(pl_module: pl.LightningModule, hook: str, before: Any = None, after: Any = None) -> None:
    """Run ``before``/``after`` around the next call of ``pl_module.<hook>`` only.

    No callback hook runs between ``configure_model`` and the checkpoint restore, nor before the restored state dict
    is loaded; this bridges those two gaps through the instance (never the class), and the wrap removes itself after
    one call (``teardown`` removes it if it never ran).
    """
    original = getattr(pl_module, hook)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        pl_module.__dict__.pop(hook, None)
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after()
        return result

    pl_module.__dict__[hook] = wrapped
