"""``LoRACallback``: add it to a ``Trainer`` and the model trains an adapter instead of its weights.

Lightning calls, in ``fit``: ``Callback.setup`` -> ``LightningModule.setup`` -> ``configure_model`` -> checkpoint restore
-> ``strategy.setup`` (precision, DDP/FSDP wrapping, optimizers) -> ``on_fit_start``. Adapters must exist before the
restore and the optimizers, so they are injected in ``setup``, or right after ``configure_model`` for models that
build their layers there.

Resuming is exact (the adapter equals an uninterrupted run's, dropout masks included) at an epoch boundary, and
mid-epoch when the train loader is torchdata's ``StatefulDataLoader``, whose position Lightning checkpoints. A plain
``DataLoader`` resumed mid-epoch restarts that epoch's data from its first batch for the batches left, so the rest of
that epoch sees other batches (in the test, 0.05 apart after 7 more steps). torchdata 0.11 with ``shuffle=True``
draws the next epoch's order differently after a mid-epoch restore (torchdata alone does this too).
"""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn
from typing_extensions import override

from lightning_lora.callbacks._lightning import (
    CALLBACK_BASES,
    is_overridden,
    rank_zero_info,
    rank_zero_warn,
    unsupported_strategy,
)
from lightning_lora.callbacks.checkpoint_io import AdapterCheckpointIO
from lightning_lora.callbacks.exports import export_final, export_step, finish_final
from lightning_lora.config import ALL_LINEAR, AdapterConfig, ConfigError, method_option_names
from lightning_lora.fingerprint import base_fingerprint, compare_fingerprints
from lightning_lora.io import find_hf_model
from lightning_lora.methods.registry import method_spec
from lightning_lora.plugins.quantization import quantize_for_strategy
from lightning_lora.quantize import MergeReport, as_quantize_config
from lightning_lora.surgery import (
    adapter_parameters,
    adapters,
    enable_input_grads_for_checkpointing,
    freeze_base,
    inject,
    injected_config,
    parameter_counts,
)
from lightning_lora.targeting import _matches, layer_index  # PEFT's matching rules

if TYPE_CHECKING:  # either package's classes; annotations only
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "lightning_lora"


class LoRACallback(*CALLBACK_BASES):  # type: ignore[misc]
    # Both packages' Callback when both are installed, so that either Trainer accepts it (see _lightning.py).
    """Inject a parameter-efficient adapter into the LightningModule's model and train only the adapter.

    Args:
        method: the adapter method: lora, dora, houlsby or pfeiffer. Options of another method are an error.
        r: LoRA/DoRA rank (None: 8).
        alpha: LoRA/DoRA scale numerator: the update is (alpha / r) * B A (None: 16).
        dropout: LoRA/DoRA dropout on the adapter's input (None: 0.0).
        target_modules: which modules to adapt, with PEFT's rules: a list of names (a path equal to a name or
            ending in .name), a regex matched against the whole path, or all-linear (every linear layer but the
            output head: the LoRA/DoRA default). Bottleneck adapters find their sublayers when unset.
        exclude_modules: names or a regex of modules never to adapt, even when target_modules matches them.
        layers_to_transform: only adapt modules in these layer indices (an int or a list of ints).
        layers_pattern: the name(s) of the layer list that layers_to_transform indexes (e.g. layers, h).
        rank_pattern: a module name or regex mapped to its own rank, overriding r for those modules (LoRA/DoRA).
        alpha_pattern: a module name or regex mapped to its own alpha, overriding alpha (LoRA/DoRA).
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r (rsLoRA; LoRA/DoRA; None: false).
        init_weights: true (A Kaiming-uniform, B zero: PEFT's default), gaussian, or false (both random: the
            adapter changes the output from the start) (LoRA/DoRA; None: true).
        reduction_factor: bottleneck width is the hidden size divided by this (houlsby/pfeiffer; None: 16).
        nonlinearity: bottleneck activation: relu, gelu, silu, swish or tanh (houlsby/pfeiffer; None: relu).
        model_attr: dotted path of the module to adapt inside the LightningModule. None finds the one Hugging Face
            PreTrainedModel in it, else adapts the LightningModule itself.
        export_dir: where exports go; None is <trainer.log_dir or default_root_dir>/lightning_lora.
        export_merged: also write the merged model (with the LightningModule's tokenizer, if it has one, so the
            directory is a standalone model). None means yes for methods that can merge.
        export_on_checkpoint: export at every checkpoint too (into export_dir/step-<N>), not only at fit end.
        seed: seed of the adapter's initialization, drawn in a forked RNG so the run's random stream is untouched;
            None uses torch.initial_seed() (what seed_everything sets), so every rank and strategy agree.
        quantize: QLoRA: quantize the frozen base of the adapted nn.Linear layers with torchao: nf4, int8 or int4, or
            a dict with format and its options, e.g. {format: nf4, scaler_block_size: 64} (lightning_lora.quantize).
            Done on the training device right after the precision plugin's cast; checkpoints never hold the base.
            The merged export is then dequant(Wq) + dW, and what that merge cost is logged and kept in merge_report.
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
        quantize: Union[str, dict[str, Any], None] = None,
    ) -> None:
        given = locals()
        options = {name: given[name] for name in method_option_names() if given.get(name) is not None}
        self.config = AdapterConfig.create(method, **options)
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
        self.quantize = as_quantize_config(quantize)
        self.adapter_dir: Optional[Path] = None
        self.merged_dir: Optional[Path] = None
        self.merge_report: Optional[MergeReport] = None  # what the fit-end merge from a quantized base cost
        self._root: Optional[nn.Module] = None
        self._root_path = ""
        self._fingerprint: Optional[str] = None
        self._user_strict_loading: Optional[bool] = None
        self._trainer: Optional[pl.Trainer] = None
        self._exported_step: Optional[int] = None
        self._resume_rng: Optional[dict[str, Any]] = None

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
        strategy = unsupported_strategy(trainer.strategy)
        if strategy is not None:
            raise ConfigError(
                f"LoRACallback does not support {strategy} yet: sharded parameters need sharding-aware injection, "
                "checkpoints and merges. Use strategy='ddp' (adapters are small, so plain data parallelism fits "
                "wherever the base model fits on one device), or train without LoRACallback."
            )
        self._trainer = trainer
        if is_overridden("configure_model", pl_module):
            _wrap_once(pl_module, "configure_model", after=lambda: self._inject(trainer, pl_module))
        else:
            self._inject(trainer, pl_module)
        _wrap_once(pl_module, "on_load_checkpoint", before=lambda checkpoint: self._check_checkpoint(pl_module, checkpoint))
        # A true-half precision ("bf16-true", "16-true") casts the whole module in strategy.setup, after this hook and
        # before the optimizers exist: right after that cast is where adapters go back to float32 (and the base is
        # quantized, on its device).
        _wrap_once(trainer.precision_plugin, "convert_module", after=self._after_precision_cast)
        io = trainer.strategy.checkpoint_io
        if isinstance(io, AdapterCheckpointIO):  # left by an earlier fit of this Trainer
            io = io.checkpoint_io
        trainer.strategy.checkpoint_io = AdapterCheckpointIO(io, self._prepare_checkpoint, self._after_save)
        if trainer.is_global_zero and stage == "fit":
            finish_final(self._export_root(trainer))  # an interrupted final export of an earlier run

    def _after_precision_cast(self) -> None:
        """Quantize the base if asked, and keep adapters in float32 whatever the precision plugin cast them to."""
        if self._root is None:
            return
        if self.quantize is not None:
            quantize_for_strategy(self._trainer, self._trainer.lightning_module, self._root, self.quantize)
        for p in adapter_parameters(self._root):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()

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
        else:  # a second fit/test in the same process, or an adapter loaded by the user: train what is there
            differences = _differences(root, existing, self.config)
            if differences:
                raise ConfigError(
                    f"{type(root).__name__} already holds adapters with other options than this LoRACallback's "
                    f"({'; '.join(differences)}). Give the callback the model's options to keep training that "
                    "adapter, or remove it first (lightning_lora.unload) to train a new one."
                )
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
                f"lightning_lora: adapter weights are {', '.join(sorted(half))} (something cast them after injection, "
                "e.g. a .to(dtype) in setup or configure_model), so small updates round away. Cast the base model "
                "before the Trainer starts, or use precision='bf16-true': adapters then stay float32."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for hook in ("configure_model", "on_load_checkpoint"):
            pl_module.__dict__.pop(hook, None)
        trainer.precision_plugin.__dict__.pop("convert_module", None)
        if self._user_strict_loading is not None:
            pl_module.strict_loading = self._user_strict_loading
            self._user_strict_loading = None

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _frozen_keys(self) -> set[str]:
        prefix = f"{self._root_path}." if self._root_path else ""
        return {prefix + name for name, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def _identity(self) -> dict[str, Any]:
        return {"method": self.config.method, "config": self.config.to_dict(), "base_fingerprint": self._fingerprint,
                "model_attr": self._root_path, "targets": sorted(adapters(self.model))}

    def _prepare_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen base tensors and record what the adapter belongs to; run by ``AdapterCheckpointIO`` on every
        checkpoint, including ``save_weights_only`` ones, for which Lightning skips ``on_save_checkpoint``."""
        if self._root is None or "state_dict" not in checkpoint:
            return
        frozen = self._frozen_keys()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k in frozen]:
            del state[key]
        checkpoint.setdefault(CHECKPOINT_KEY, self._identity())

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {**self._identity(), "rng": _rng_state()}
        self._prepare_checkpoint(checkpoint)

    def _after_save(self) -> None:
        """A checkpoint file is complete (rank zero only): export this step once, however many files it wrote."""
        trainer = self._trainer
        if not self.export_on_checkpoint or trainer is None or self._exported_step == trainer.global_step:
            return
        self._exported_step = trainer.global_step
        directory = self._export_root(trainer) / f"step-{trainer.global_step}"
        try:
            export_step(self.model, directory, self.export_merged, self._tokenizer(trainer))
        except OSError as err:  # ExportError, including safetensors' errors: the checkpoint is written, keep training
            rank_zero_warn(f"lightning_lora: the export of step {trainer.global_step} to {directory} failed, training "
                           f"goes on and the checkpoint is complete: {err}")

    def _check_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Runs just before Lightning loads the checkpoint's state dict (non-strictly, since the frozen base is not in
        it): refuse a checkpoint of another adapter or base, and any mismatch beyond the missing base tensors, while
        the model is still untouched."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None:
            differences = _option_differences(saved["config"], self.config.to_dict(), "the checkpoint")
            if differences:
                raise ConfigError(
                    f"The checkpoint's adapter was trained with other options than this LoRACallback's "
                    f"({'; '.join(differences)}); resume with the checkpoint's options."
                )
            mismatch = compare_fingerprints(saved["base_fingerprint"], self._fingerprint)
            if mismatch is not None:
                raise ConfigError(
                    f"The checkpoint's adapter was trained on a different base model: {mismatch}. Load the base it "
                    "was trained on."
                )
        model_state = pl_module.state_dict()
        saved_state = checkpoint["state_dict"]
        missing = sorted(set(model_state) - set(saved_state) - self._frozen_keys())
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
            # seed), the draws match an uninterrupted run resumed at an epoch boundary; a run resumed mid-epoch has
            # drawn that seed long before, so there the state is set again just before the first batch.
            _set_rng_state(saved["rng"])
            self._resume_rng = saved["rng"]

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        if self._resume_rng is not None:
            if batch_idx > 0:  # resumed mid-epoch
                _set_rng_state(self._resume_rng)
            self._resume_rng = None

    # -- export ------------------------------------------------------------------------------------------------------
    def _export_root(self, trainer: pl.Trainer) -> Path:
        if self.export_dir is not None:
            return Path(self.export_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "lightning_lora"

    @staticmethod
    def _tokenizer(trainer: pl.Trainer) -> Any:
        tokenizer = getattr(trainer.lightning_module, "tokenizer", None)
        return tokenizer if callable(getattr(tokenizer, "save_pretrained", None)) else None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write ``adapter/`` and ``merged/`` as a pair; a failure (a full disk) raises after training, since the last
        checkpoint holds the adapter, and leaves the previous pair in place."""
        try:
            if trainer.is_global_zero:
                self.adapter_dir, self.merged_dir = export_final(
                    self.model, self._export_root(trainer), self.export_merged, self._tokenizer(trainer),
                    report=lambda report: setattr(self, "merge_report", report))
                rank_zero_info(f"lightning_lora: adapter written to {self.adapter_dir}"
                               + (f", merged model to {self.merged_dir}" if self.merged_dir else "")
                               + (f"\n{self.merge_report}" if self.merge_report else ""))
                stale = self.adapter_dir.parent / "merged"
                if self.merged_dir is None and stale.exists():  # never deleted: it may be all a user kept of a run
                    rank_zero_warn(f"lightning_lora: {stale} is a merged export from an earlier run; this run wrote "
                                   f"only {self.adapter_dir} (export_merged=False), so the two do not match. Remove "
                                   "it, or write it again with lightning_lora.export_merged.")
        finally:
            trainer.strategy.barrier("lightning_lora_export")


_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def _differences(root: nn.Module, have: AdapterConfig, want: AdapterConfig) -> list[str]:
    """The options in which the model's adapter (``have``) differs from the callback's (``want``), as
    ``option: value in the model vs value in the callback``. Targeting options count only if ``want`` would pick
    other modules than the adapted ones: a loaded adapter records the exact paths it adapts, not the spec."""
    h, w = have.to_dict(), want.to_dict()
    if any(h.get(k) != w.get(k) for k in _TARGETING) and _picks_exactly(root, want, sorted(adapters(root))):
        h.update({k: w.get(k) for k in _TARGETING})
    return _option_differences(h, w, "the model")


def _option_differences(have: dict[str, Any], want: dict[str, Any], where: str) -> list[str]:
    """``option: value in <where> vs value in the callback`` for each option whose values differ."""
    return [f"{k}: {have.get(k)!r} in {where} vs {want.get(k)!r} in the callback"
            for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]


def _picks_exactly(root: nn.Module, config: AdapterConfig, adapted: list[str]) -> bool:
    """Whether ``config``'s target list or regex picks exactly the ``adapted`` module paths of ``root`` (PEFT's
    matching rules; ``all-linear`` is not resolved here and counts as a difference)."""
    spec = config.target_modules
    if spec is None or spec == ALL_LINEAR:
        return False
    layers = config.layers_to_transform
    layers = None if layers is None else ([layers] if isinstance(layers, int) else list(layers))

    def picked(path: str) -> bool:
        return (_matches(spec, path) and not _matches(config.exclude_modules, path)
                and (layers is None or layer_index(path, config.layers_pattern) in layers))

    inside = tuple(f"{path}." for path in adapted)  # the adapted layers' own submodules (base layer, adapter weights)
    others = [path for path, _ in root.named_modules() if path and path not in adapted and not path.startswith(inside)]
    names_used = not isinstance(spec, list) or all(any(_matches([n], p) for p in adapted) for n in spec)
    return all(picked(p) for p in adapted) and not any(picked(p) for p in others) and names_used


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


def _wrap_once(owner: Any, hook: str, before: Any = None, after: Any = None) -> None:
    """Run ``before``/``after`` around the next call of ``owner.<hook>`` only (a LightningModule or precision plugin).

    No callback hook runs between ``configure_model`` and the checkpoint restore, before the restored state dict is
    loaded, nor between the precision plugin's module cast and the optimizers; this bridges those gaps through the
    instance (never the class), and the wrap removes itself after one call (``teardown`` removes it if it never ran).
    """
    original = getattr(owner, hook)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        owner.__dict__.pop(hook, None)
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after()
        return result

    owner.__dict__[hook] = wrapped
