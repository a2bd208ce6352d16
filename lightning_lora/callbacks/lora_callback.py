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

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import nn
from typing_extensions import override

from lightning_lora.callbacks._lightning import (
    CALLBACK_BASES,
    is_deepspeed,
    is_model_parallel,
    is_overridden,
    rank_zero_info,
    rank_zero_warn,
    unsupported_strategy,
)
from lightning_lora.callbacks import deepspeed as zero, distributed as fsdp2
from lightning_lora.callbacks.checkpoint_io import AdapterCheckpointIO
from lightning_lora.callbacks.exports import (
    export_final,
    export_step,
    finish_final,
    gathered_export,
    tokenizer_of,
)
from lightning_lora.callbacks.hooks import unwrap, wrap_once
from lightning_lora.callbacks.method_hooks import MethodHooks
from lightning_lora.callbacks.loraplus import apply_loraplus, loraplus_rates, split_groups
from lightning_lora.callbacks.named import inject_named, named_configs, route_batch
from lightning_lora.callbacks.options import differences as option_changes, merge_options
from lightning_lora.callbacks.resume import check_identity, check_state, rng_state, set_rng_state
from lightning_lora import deepspeed_io, deepspeed_quantized, distributed
from lightning_lora.config import AdapterConfig, ConfigError, method_option_names
from lightning_lora.fingerprint import base_fingerprint
from lightning_lora.io import find_hf_model
from lightning_lora.methods.registry import method_spec
from lightning_lora.plugins.compile import as_compile_policy, cache_path, compile_regions, load_cache, save_cache
from lightning_lora.plugins.quantization import quantize_for_strategy
from lightning_lora.quantize import as_quantize_config
from lightning_lora.quantize_merge import MergeReport, probe_error, probe_from_batch
from lightning_lora.mixed import clear_batch_adapters
from lightning_lora.surgery import (
    adapter_names,
    adapter_parameters,
    adapters,
    enable_input_grads_for_checkpointing,
    freeze_base,
    inject,
    injected_config,
    parameter_counts,
)

if TYPE_CHECKING:  # either package's classes; annotations only
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "lightning_lora"


class LoRACallback(*CALLBACK_BASES):  # type: ignore[misc]
    # Both packages' Callback when both are installed, so that either Trainer accepts it (see _lightning.py).
    """Inject a parameter-efficient adapter into the LightningModule's model and train only the adapter.

    Args:
        method: the adapter method (lora, dora, adalora, loha, lokr, vera, oft, boft, hra, bone, miss, houlsby,
            pfeiffer, llama_adapter, prefix, prompt, bitfit, xlora). Options of another method are an error.
        r: LoRA/DoRA rank (None: 8); LoHa/LoKr rank (None: 8); VeRA's shared projection rank (None: 256); OFT's
            blocks per layer (instead of oft_block_size); HRA's reflections (None: 8); Bone/MiSS block size (None: 64).
        alpha: LoRA/DoRA scale numerator: the update is (alpha / r) * B A (None: 16); LoHa/LoKr likewise (None: 8);
            AdaLoRA's, over init_r (None: 8).
        dropout: LoRA/DoRA/VeRA/AdaLoRA dropout on the adapter's input (None: 0.0).
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
            adapter changes the output from the start) (LoRA/DoRA; None: true); for LoRA also pissa, pissa_niter_<n>
            or olora, which move part of each base weight into A and B (the base changes at injection; exports
            hold the plain LoRA of rank 2r for the original base).
            OFT/BOFT/HRA/Bone: false starts from random rotations or blocks (for tests); MiSS also mini.
        loraplus_lr_ratio: LoRA+: B trains at this multiple of the optimizer's learning rate (true: 16), applied to
            the optimizers configure_optimizers builds (LoRA/DoRA; None: off).
        loraplus_lr_embedding: LoRA+: the learning rate of embedding adapters (None: 1e-6, as PEFT).
        init_r: AdaLoRA's starting rank of every adapted layer (None: 12).
        target_r: AdaLoRA's average rank once the budget has shrunk (None: 8).
        tinit: AdaLoRA: steps before the budget starts to shrink (None: 0).
        tfinal: AdaLoRA: last steps with the final budget fixed (None: 0).
        deltaT: AdaLoRA: steps between two budget allocations (None: 1).
        beta1: AdaLoRA: EMA factor of the importance (sensitivity) scores (None: 0.85).
        beta2: AdaLoRA: EMA factor of their uncertainty (None: 0.85).
        orth_reg_weight: AdaLoRA: weight of the orthogonality regularizer of P and Q (None: 0.5); HRA: weight of
            the paper's ||I - U^T U||^2 regularizer (None: 0, off as in PEFT).
        oft_block_size: OFT block size; in_features must divide by it (None: 32 unless r is given).
        coft: constrained OFT: keep each block's generator within eps (None: false).
        eps: COFT's radius (None: 6e-5).
        block_share: OFT: one block shared by the whole layer (None: false).
        use_cayley_neumann: OFT: Neumann series instead of the exact Cayley inverse, as PEFT (None: true).
        num_cayley_neumann_terms: OFT: terms of that series (None: 5).
        boft_block_size: BOFT block size (None: 4 unless boft_block_num is given).
        boft_block_num: BOFT blocks per factor (instead of boft_block_size).
        boft_n_butterfly_factor: BOFT butterfly factors; 1 is OFT with an output scale (None: 1).
        boft_dropout: BOFT: fraction of one random factor's blocks set to the identity per step (None: 0).
        apply_GS: HRA: orthonormalize the reflection vectors (Gram-Schmidt) (None: false).
        mini_r: MiSS with init_weights=mini: width of the trained block tiled along out (None: 1).
        miss_dropout: MiSS: dropout on its input (None: 0).
        total_step: AdaLoRA: the schedule's length in optimizer steps (None: the Trainer's estimated steps).
        kept_triplets: AdaLoRA: which triplets each layer keeps, as an export records them (PEFT's rank_pattern,
            {<path>.lora_E: [true, false, ...]}); set to continue from those ranks (None: all init_r).
        rank_dropout: LoHa/LoKr: probability of dropping each output row of the update in a training step (None: 0).
        module_dropout: LoHa/LoKr: probability of skipping a layer's whole update in a training step (None: 0);
            OFT: fraction of a layer's blocks set to the identity in a training step (None: 0).
        use_effective_conv2d: LoHa/LoKr: factor convolution kernels through a small core (FedPara's Proposition 3)
            instead of the flattened (out, in * k) matrix (None: false).
        rank_dropout_scale: LoKr: rescale the kept rows of rank_dropout by the kept fraction (None: false).
        decompose_both: LoKr: make the left Kronecker factor low-rank too (None: false).
        decompose_factor: LoKr: the size of one side of each Kronecker split (None: -1, near the square root).
        d_initial: VeRA: starting value of lambda_d (None: 0.1).
        projection_prng_key: VeRA: seed of the shared frozen random matrices A and B (None: 0).
        save_projection: VeRA: store A and B in the adapter file, not only their seed (None: true).
        reduction_factor: bottleneck width is the hidden size divided by this (houlsby/pfeiffer; None: 16).
        nonlinearity: bottleneck activation: relu, gelu, silu, swish or tanh (houlsby/pfeiffer; None: relu).
        adapter_len: LLaMA-Adapter: learned prompt vectors per adapted attention layer (llama_adapter; None: 10).
        adapter_layers: LLaMA-Adapter: how many of the top attention layers get prompts (None: all of them).
        num_virtual_tokens: prompt/prefix tuning: virtual tokens put before the input or the keys/values (None: 20).
        prefix_projection: prefix tuning: train the prefix through a two-layer MLP (None: false).
        encoder_hidden_size: prefix tuning: that MLP's width (None: the key/value width).
        prompt_tuning_init: prompt tuning: RANDOM, TEXT (from prompt_tuning_init_text) or SAMPLE_VOCAB (None: RANDOM).
        prompt_tuning_init_text: prompt tuning: the text whose token embeddings start the prompt (with TEXT).
        tokenizer_name_or_path: prompt tuning: the tokenizer (a local path; in Python also the object) for TEXT.
        experts: X-LoRA: the names of the LoRA adapters in the model it gates (None: all of them).
        hidden_size: X-LoRA: the width of the hidden state its classifier reads (None: the model's hidden_size).
        enable_softmax: X-LoRA: softmax over the experts' scalings (None: true).
        enable_softmax_topk: X-LoRA: softmax over the top_k_lora kept scalings only (None: false).
        softmax_temperature: X-LoRA: divides the scalings before the softmax (None: 1.0).
        layerwise_scalings: X-LoRA: one set of scalings per adapted layer instead of one for all (None: false).
        top_k_lora: X-LoRA: keep only the k largest scalings per token (None: all, dense).
        xlora_depth: X-LoRA: linear layers in the classifier (None: 1).
        xlora_size: X-LoRA: the classifier's hidden width when xlora_depth > 1 (None: 2048).
        xlora_dropout_p: X-LoRA: dropout between the classifier's layers (None: 0.2).
        scaling_pass_value: X-LoRA: every expert's scaling in the first (scaling) pass (None: 0, the base model).
        global_scaling_weight: X-LoRA: multiplies every expert's output (None: 1.0).
        use_trainable_adapters: X-LoRA: train the experts too, not only the classifier (None: false).
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
            The merged export's merge cost is measured, printed and kept in merge_report.
        compile: torch.compile each transformer block in place (regional: one block's graph serves all), with
            use_cache off while compiled: None is on when the Trainer's device is CUDA, true/false, a mode
            (max-autotune, ...), or a dict of torch.compile options plus cache (true: keep the compile cache in
            <export_dir, else default_root_dir/lightning_lora>/compile_cache.bin so the next run starts fast; a
            path; false)
            (lightning_lora.plugins.compile).
        merge_target: what the merged export of a quantized base holds: dequantized (dequant(Wq) + dW: what the
            trained model computed), requantized (back into the quantized format: smaller, loses most of a 4-bit
            update; load it with lightning_lora.load_quantized) or original (dW added to original_weights).
            None: dequantized.
        original_weights: the full-precision base for merge_target=original: a .safetensors file or the directory
            save_pretrained wrote, keyed as the adapted model's state dict.
        adapters: several named adapters in one run, each with its own method and options: a dict of adapter name to
            options, e.g. {task_a: {method: lora, r: 8}, task_b: {method: dora, r: 4, target_modules: [q_proj]}} (the
            method options above must then be unset). All are active; with adapter_key each example trains its own.
            The adapter export writes each in PEFT's layout (sub-folders by name); no merged export unless asked.
        adapter_key: the key of a dict batch that holds each example's adapter name ("__base__" for none): one
            forward applies each example's own adapter (lightning_lora.mixed), in fit, validate, test and predict.
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
        loraplus_lr_ratio: Union[bool, float, None] = None,
        loraplus_lr_embedding: Optional[float] = None,
        init_r: Optional[int] = None,
        target_r: Optional[int] = None,
        tinit: Optional[int] = None,
        tfinal: Optional[int] = None,
        deltaT: Optional[int] = None,
        beta1: Optional[float] = None,
        beta2: Optional[float] = None,
        orth_reg_weight: Optional[float] = None,
        oft_block_size: Optional[int] = None,
        coft: Optional[bool] = None,
        eps: Optional[float] = None,
        block_share: Optional[bool] = None,
        use_cayley_neumann: Optional[bool] = None,
        num_cayley_neumann_terms: Optional[int] = None,
        boft_block_size: Optional[int] = None,
        boft_block_num: Optional[int] = None,
        boft_n_butterfly_factor: Optional[int] = None,
        boft_dropout: Optional[float] = None,
        apply_GS: Optional[bool] = None,
        mini_r: Optional[int] = None,
        miss_dropout: Optional[float] = None,
        total_step: Optional[int] = None,
        kept_triplets: Optional[dict[str, list[bool]]] = None,
        rank_dropout: Optional[float] = None,
        module_dropout: Optional[float] = None,
        use_effective_conv2d: Optional[bool] = None,
        rank_dropout_scale: Optional[bool] = None,
        decompose_both: Optional[bool] = None,
        decompose_factor: Optional[int] = None,
        d_initial: Optional[float] = None,
        projection_prng_key: Optional[int] = None,
        save_projection: Optional[bool] = None,
        reduction_factor: Optional[int] = None,
        nonlinearity: Optional[str] = None,
        adapter_len: Optional[int] = None,
        adapter_layers: Optional[int] = None,
        num_virtual_tokens: Optional[int] = None,
        prefix_projection: Optional[bool] = None,
        encoder_hidden_size: Optional[int] = None,
        prompt_tuning_init: Optional[str] = None,
        prompt_tuning_init_text: Optional[str] = None,
        tokenizer_name_or_path: Optional[str] = None,
        experts: Optional[list[str]] = None,
        hidden_size: Optional[int] = None,
        enable_softmax: Optional[bool] = None,
        enable_softmax_topk: Optional[bool] = None,
        softmax_temperature: Optional[float] = None,
        layerwise_scalings: Optional[bool] = None,
        top_k_lora: Optional[int] = None,
        xlora_depth: Optional[int] = None,
        xlora_size: Optional[int] = None,
        xlora_dropout_p: Optional[float] = None,
        scaling_pass_value: Optional[float] = None,
        global_scaling_weight: Optional[float] = None,
        use_trainable_adapters: Optional[bool] = None,
        model_attr: Optional[str] = None,
        export_dir: Optional[str] = None,
        export_merged: Optional[bool] = None,
        export_on_checkpoint: bool = False,
        seed: Optional[int] = None,
        quantize: Union[str, dict[str, Any], None] = None,
        compile: Union[bool, str, dict[str, Any], None] = None,
        merge_target: Optional[str] = None,
        original_weights: Optional[str] = None,
        adapters: Optional[dict[str, dict[str, Any]]] = None,
        adapter_key: Optional[str] = None,
    ) -> None:
        given = locals()
        options = {name: given[name] for name in method_option_names() if given.get(name) is not None}
        self.config = AdapterConfig.create(method, **options)
        self.named_configs = named_configs(adapters, options)  # name -> config, for several named adapters
        if self.named_configs:
            self.config = next(iter(self.named_configs.values()))
        self.adapter_key = adapter_key
        mergeable = all(method_spec(c.method).mergeable for c in self.named_configs.values() or [self.config])
        if export_merged and not mergeable:
            raise ConfigError(
                f"{method!r} adapters are inserted modules and cannot be merged into the base weights; set "
                "export_merged=False (the standalone adapter export is still written)."
            )
        self.model_attr = model_attr
        self.export_dir = export_dir
        self.export_merged = (mergeable and not self.named_configs) if export_merged is None else export_merged
        self.export_on_checkpoint = export_on_checkpoint
        self.seed = seed
        self.quantize = as_quantize_config(quantize)
        self.merge_options = merge_options(merge_target, original_weights, self.quantize, self.export_merged)
        self.compile_policy = as_compile_policy(compile)
        self._compiled: Optional[Any] = None  # plugins.compile.CompiledRegions while the blocks are compiled
        self._compile_cache: Optional[Path] = None
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
        self._probe: Any = None  # the first training example, for the fit-end merge report of a quantized base
        self._sharded = False  # ModelParallelStrategy (FSDP2): adapters may be DTensors
        self._deepspeed = False  # DeepSpeedStrategy: ZeRO holds the adapters' masters (stage 3: partitions them too)
        self._method_hooks = MethodHooks(self.named_configs or {"": self.config}, strategy="")  # set up in setup
        self._pending_optimizer_states: Optional[list] = None  # a resumed FSDP2 run's, loaded after pruning
        self._optimizers_pruned = False  # on_fit_start has run (frozen parameters left the optimizers)
        self._replicated: list[nn.Parameter] = []  # FSDP2: trainable parameters kept whole on every rank

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
        fsdp2.check_strategy(unsupported_strategy(trainer.strategy))
        self._trainer = trainer
        self._sharded = is_model_parallel(trainer.strategy)
        self._deepspeed = is_deepspeed(trainer.strategy)
        self._method_hooks = MethodHooks(self.named_configs or {"": self.config},
                                         "deepspeed" if self._deepspeed else "fsdp2" if self._sharded else "")
        if stage == "fit" and not self._deepspeed:  # DeepSpeedStrategy is a DDPStrategy too, with its own checks
            fsdp2.check_ddp(trainer.strategy, self.adapter_key, self.named_configs or {"": self.config})
        if self._sharded:
            self._setup_fsdp2(trainer, pl_module)
        elif self._deepspeed:
            self._setup_deepspeed(trainer, pl_module)
        elif is_overridden("configure_model", pl_module):
            wrap_once(pl_module, "configure_model", after=lambda: self._inject(trainer, pl_module))
        else:
            self._inject(trainer, pl_module)
        wrap_once(pl_module, "on_load_checkpoint", before=lambda checkpoint: self._check_checkpoint(pl_module, checkpoint))
        # A true-half precision ("bf16-true", "16-true") casts the whole module in strategy.setup, after this hook and
        # before the optimizers exist: right after that cast is where adapters go back to float32 (and the base is
        # quantized, on its device).
        wrap_once(trainer.precision_plugin, "convert_module", after=self._after_precision_cast)
        io = trainer.strategy.checkpoint_io
        if isinstance(io, AdapterCheckpointIO):  # left by an earlier fit of this Trainer
            io = io.checkpoint_io
        trainer.strategy.checkpoint_io = AdapterCheckpointIO(io, self._prepare_checkpoint, self._after_save)
        if trainer.is_global_zero and stage == "fit":
            finish_final(self._export_root(trainer))  # an interrupted final export of an earlier run

    def _setup_fsdp2(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under ModelParallelStrategy the user's configure_model shards the model, so the adapters go in now, before
        it (every rank then shards the adapted tree), and checkpoints become adapter-only (callbacks/distributed.py)."""
        fsdp2.check_fsdp2(trainer.strategy, trainer.world_size, str(getattr(trainer.precision_plugin, "precision", "")),
                          self.merge_options, self.quantize, self.named_configs or {"": self.config})
        try:
            self._inject(trainer, pl_module)
        except ConfigError as err:
            raise ConfigError(
                f"{err} Under ModelParallelStrategy the adapters are injected before configure_model (which shards "
                "the model), so the model must exist when fit starts: build it in __init__ and shard it in "
                "configure_model (lightning_lora.distributed.shard_model)."
            ) from None
        if self.quantize is not None:  # before configure_model: FSDP2 then shards the quantized weights (NF4 has
            quantize_for_strategy(trainer, pl_module, self._root, self.quantize)  # FSDP2 support in torchao)
        fsdp2.use_adapter_checkpoints(trainer.strategy, self._frozen_keys,
                                      lambda checkpoint: self._check_checkpoint(pl_module, checkpoint),
                                      self._export_step_all_ranks,
                                      self._restore_optimizer_states)

    def _setup_deepspeed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under DeepSpeedStrategy only the adapter reaches ZeRO's optimizer and checkpoints are adapter-only
        (callbacks/deepspeed.py). ZeRO-3 runs configure_model inside deepspeed.zero.Init, so there the adapters go
        in before it, as under FSDP2."""
        zero.check_deepspeed(trainer.strategy, self.named_configs or {"": self.config}, self.adapter_key,
                             self.quantize, self.compile_policy.enabled, self.merge_options,
                             accumulate=trainer.accumulate_grad_batches)
        if zero.zero_stage(trainer.strategy) == 3:
            try:
                self._inject(trainer, pl_module)
            except ConfigError as err:
                raise zero.refuse_late_model(err) from None
        elif is_overridden("configure_model", pl_module):
            wrap_once(pl_module, "configure_model", after=lambda: self._inject(trainer, pl_module))
        else:
            self._inject(trainer, pl_module)
        ratio = getattr(self.config, "loraplus_lr_ratio", None)
        loraplus = None if ratio is None else lambda optimizer, scheduler: split_groups(  # before ZeRO flattens them
            optimizer, [scheduler] if scheduler is not None else [],
            loraplus_rates(adapters(self.model), ratio, self.config.loraplus_lr_embedding))
        zero.use_adapter_checkpoints(trainer.strategy, self._frozen_keys,
                                     lambda checkpoint: self._check_checkpoint(pl_module, checkpoint),
                                     self._export_step_all_ranks, loraplus)

    def _restore_optimizer_states(self, states: list) -> None:
        """FSDP2: a checkpoint's optimizer states, loaded once the optimizers hold only trainable parameters. Under
        ModelParallelStrategy Lightning reads the checkpoint after on_fit_start (restore_checkpoint_after_setup), so
        they load at once; they wait for on_fit_start if a strategy reads it before."""
        self._pending_optimizer_states = states
        if self._optimizers_pruned:
            self._load_optimizer_states()

    def _load_optimizer_states(self) -> None:
        for optimizer, state in zip(self._trainer.optimizers, self._pending_optimizer_states or []):
            distributed.load_optimizer_state(optimizer, state)
        self._pending_optimizer_states = None

    def _after_precision_cast(self) -> None:
        """Quantize the base if asked, and keep adapters in float32 whatever the precision plugin cast them to."""
        if self._root is None:
            return
        if self.quantize is not None and not self._sharded:  # under FSDP2 it was done before sharding
            quantize_for_strategy(self._trainer, self._trainer.lightning_module, self._root, self.quantize)
        if self._deepspeed:  # before deepspeed.initialize: ZeRO must never see a quantized weight
            deepspeed_quantized.hide_quantized(self._root, self._trainer.strategy.root_device)
        if self._sharded:  # configure_model has sharded the model: let fully_shard free the full weights
            distributed.release_unsharded(self._root)
            fsdp2.check_routing(self._root, self.adapter_key)
        for p in adapter_parameters(self._root):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        self._compile(self._trainer)

    def _compile(self, trainer: pl.Trainer) -> None:
        """Compile the adapted model's blocks (after injection, the precision cast and quantization; before DDP's
        wrap and the optimizers, neither of which a block compiled in place changes), loading the compile cache of an
        earlier run first."""
        if self._deepspeed or self._compiled is not None or not self.compile_policy.active(
                trainer.strategy.root_device):
            return
        if getattr(trainer.lightning_module, "_compiler_ctx", None) is not None:
            rank_zero_info("lightning_lora: the LightningModule was compiled whole (trainer.fit(torch.compile(...))); "
                           "not compiling its blocks again")
            return
        # not under log_dir, which a logger numbers anew for every run: the next run of the job must find it
        self._compile_cache = cache_path(self.compile_policy,
                                         self.export_dir or Path(trainer.default_root_dir) / "lightning_lora")
        load_cache(self._compile_cache)
        self._compiled = compile_regions(self._root, self.compile_policy)
        rank_zero_info(f"lightning_lora: compiled {len(self._compiled.paths)} blocks "
                       f"({self._compiled.paths[0] or type(self._root).__name__}, ...)")

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
        method = self.config.method
        # a method that joins the model's adapters (X-LoRA over experts the module loaded) goes under its own name
        joins = getattr(type(self.config), "JOINS_ADAPTERS", False) and not self.named_configs
        existing = injected_config(root, method) if joins and method in adapter_names(root) else injected_config(root)
        seed = self.seed if self.seed is not None else torch.initial_seed()
        if existing is None and self.named_configs:
            targets = inject_named(root, self.named_configs, seed)
        elif existing is None:
            targets = inject(root, self.config, seed=seed)
        elif joins and method not in adapter_names(root):
            targets = inject(root, self.config, seed=seed, name=method)
        else:  # a second fit/test in the same process, or an adapter loaded by the user: train what is there
            differences = option_changes(root, existing, self.config) if not self.named_configs else [
                f"adapters: {adapter_names(root)} in the model vs {list(self.named_configs)} in the callback"
            ] if adapter_names(root) != list(self.named_configs) else []
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
        if self._sharded:
            self._optimizers_pruned = True
            self._load_optimizer_states()
            self._replicated = distributed.replicated_trainable(pl_module) if distributed.is_sharded(pl_module) else []
        params = list(adapter_parameters(self.model))
        if not any(p.requires_grad for p in params):
            raise ConfigError("No adapter parameter requires grad; was requires_grad changed after injection?")
        if getattr(self.config, "loraplus_lr_ratio", None) is not None and not self._deepspeed:  # there: before ZeRO
            apply_loraplus(trainer, adapters(self.model), self.config.loraplus_lr_ratio,
                           self.config.loraplus_lr_embedding)
        half = {str(p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)}
        if half and not self._deepspeed:  # DeepSpeed's bf16/fp16 modes keep float32 masters in the optimizer
            rank_zero_warn(
                f"lightning_lora: adapter weights are {', '.join(sorted(half))} (something cast them after injection, "
                "e.g. a .to(dtype) in setup or configure_model), so small updates round away. Cast the base model "
                "before the Trainer starts, or use precision='bf16-true': adapters then stay float32."
            )

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._replicated:  # FSDP2 averages the gradients of what it shards; these it was told to leave whole
            distributed.average_replicated_grads(self._replicated, fsdp2.data_parallel_group(trainer.strategy))
        self._method_hooks.before_optimizer_step(self.model)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        fsdp2.remove_adapter_checkpoints(trainer.strategy)
        zero.remove_adapter_checkpoints(trainer.strategy)
        if self._root is not None:
            deepspeed_quantized.restore_quantized(self._root)
        self._optimizers_pruned = False  # a next fit builds new optimizers
        unwrap(pl_module, "configure_model", "on_load_checkpoint")
        unwrap(trainer.precision_plugin, "convert_module")
        if self._compiled is not None:  # the model leaves fit eager again, with the user's use_cache (for generate)
            self._compiled.restore()
            self._compiled = None
        if self._user_strict_loading is not None:
            pl_module.strict_loading = self._user_strict_loading
            self._user_strict_loading = None

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def _frozen_keys(self) -> set[str]:
        prefix = f"{self._root_path}." if self._root_path else ""
        return {prefix + name for name, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def _identity(self) -> dict[str, Any]:
        return {"method": self.config.method, "config": self.config.to_dict(), "base_fingerprint": self._fingerprint,
                "model_attr": self._root_path, "targets": sorted(adapters(self.model)),
                "adapters": {name: config.to_dict() for name, config in self.named_configs.items()}}

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
        checkpoint[CHECKPOINT_KEY] = {**self._identity(), "rng": rng_state()}
        self._prepare_checkpoint(checkpoint)

    def _after_save(self) -> None:
        """A checkpoint file is complete (rank zero only): export this step once, however many files it wrote."""
        if not self._sharded and not self._deepspeed:  # there every rank takes part (_export_step_all_ranks)
            self._export_step()

    def _export_step_all_ranks(self) -> None:
        """FSDP2/DeepSpeed: every rank gathers the adapter (adapter tensors only), rank zero writes the step export."""
        trainer = self._trainer
        if self.export_on_checkpoint and trainer is not None and self._exported_step != trainer.global_step:
            with self._gathered_export() as tensors:
                if trainer.is_global_zero:
                    self._export_step(tensors)
            self._exported_step = trainer.global_step  # on every rank: each decides alike whether to gather

    def _gathered_export(self) -> Any:
        """Collective under FSDP2 and DeepSpeed: whole adapter tensors, and the merged tensors' iterator (or None)."""
        if self._deepspeed:
            return deepspeed_quantized.gathered_export(self.model, self.export_merged)
        return gathered_export(self.model, self._sharded, self.export_merged)

    def _export_step(self, tensors: Optional[Any] = None) -> None:
        trainer = self._trainer
        if not self.export_on_checkpoint or trainer is None or self._exported_step == trainer.global_step:
            return
        self._exported_step = trainer.global_step
        directory = self._export_root(trainer) / f"step-{trainer.global_step}"
        try:
            export_step(self.model, directory, self.export_merged, self._tokenizer(trainer), self._fingerprint,
                        self.merge_options, tensors)
        except OSError as err:  # ExportError, including safetensors' errors: the checkpoint is written, keep training
            rank_zero_warn(f"lightning_lora: the export of step {trainer.global_step} to {directory} failed, training "
                           f"goes on and the checkpoint is complete: {err}")

    def _check_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Runs just before Lightning loads the checkpoint's state dict (non-strictly, since the frozen base is not in
        it): refuse a checkpoint of another adapter or base, and any mismatch beyond the missing base tensors, while
        the model is still untouched."""
        check_identity(checkpoint.get(CHECKPOINT_KEY), self.config.to_dict(), self._fingerprint,
                       {name: config.to_dict() for name, config in self.named_configs.items()})
        model_state = deepspeed_io.state_shapes(pl_module) if self._deepspeed else pl_module.state_dict()
        check_state(model_state, checkpoint["state_dict"], self._frozen_keys(),
                    strict=self._user_strict_loading is not False)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and "rng" in saved:
            # Lightning does not checkpoint RNG state, so a resumed run would draw other dropout masks than an
            # uninterrupted one. Restored here, before the fit loop creates its DataLoader iterator (which draws a
            # seed), the draws match an uninterrupted run resumed at an epoch boundary; a run resumed mid-epoch has
            # drawn that seed long before, so there the state is set again just before the first batch.
            set_rng_state(saved["rng"])
            self._resume_rng = saved["rng"]

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        self._route_batch(batch)
        if self._resume_rng is not None:
            if batch_idx > 0:  # resumed mid-epoch
                set_rng_state(self._resume_rng)
            self._resume_rng = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._method_hooks.after_batch(self.model, trainer.global_step - 1, trainer.estimated_stepping_batches)
        if self._probe is None and self.quantize is not None and self.export_merged and not (self._sharded
                                                                                             or self._deepspeed):
            self._probe = probe_from_batch(self.model, batch)
        if self._compiled is not None and not self._compiled.cache_saved and trainer.is_global_zero:
            self._compiled.cache_saved = save_cache(self._compile_cache)  # the training graphs, once they exist
        self._unroute_batch()

    def _route_batch(self, batch: Any) -> None:
        """With ``adapter_key``: each example of ``batch`` runs its own adapter (``mixed.set_batch_adapters``)."""
        route_batch(self._root, self.adapter_key, batch)

    def _unroute_batch(self) -> None:
        if self.adapter_key is not None and self._root is not None:
            clear_batch_adapters(self._root)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._route_batch(batch)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._unroute_batch()

    @override
    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._route_batch(batch)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._unroute_batch()

    @override
    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._route_batch(batch)

    @override
    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._unroute_batch()

    # -- export ------------------------------------------------------------------------------------------------------
    def _export_root(self, trainer: pl.Trainer) -> Path:
        if self.export_dir is not None:
            return Path(self.export_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "lightning_lora"  # log_dir broadcasts: only if needed

    @staticmethod
    def _tokenizer(trainer: pl.Trainer) -> Any:
        return tokenizer_of(trainer.lightning_module)

    def _probe_option(self) -> dict[str, Any]:
        """``{"probe": <the first training example>}`` for the fit-end merge of a quantized base, so its report
        measures the output change too; empty (with a warning that says why) when the model cannot run it alone."""
        if self._probe is None:
            return {}
        error = probe_error(self.model, self._probe)
        if error is not None:
            rank_zero_warn(f"lightning_lora: the merge report has no output comparison: the adapted model cannot run the "
                           f"first training example by itself ({error}). lightning_lora.export_merged(..., probe=batch) "
                           "measures it for a batch you pass.")
            return {}
        return {"probe": self._probe}

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under DeepSpeed the final export runs here: Lightning's teardown, before ``on_fit_end``, moves the module to
        the CPU, where ZeRO's gathers (NCCL collectives) can no longer run."""
        if self._deepspeed:
            self._final_export(trainer)
            deepspeed_quantized.restore_quantized(self.model)  # before Lightning's teardown moves the module to the CPU

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._deepspeed:
            self._final_export(trainer)

    def _final_export(self, trainer: pl.Trainer) -> None:
        """Write ``adapter/`` and ``merged/`` as a pair; a failure (a full disk) raises after training, since the last
        checkpoint holds the adapter, and leaves the previous pair in place."""
        try:
            if trainer.is_global_zero and self._compiled is not None:
                save_cache(self._compile_cache)  # now with the validation graphs too
            # FSDP2/DeepSpeed: every rank gathers the adapter tensors (only those), rank zero writes them
            with self._gathered_export() as tensors:
                if trainer.is_global_zero:
                    self.adapter_dir, self.merged_dir = export_final(
                        self.model, self._export_root(trainer), self.export_merged, self._tokenizer(trainer),
                        report=lambda report: setattr(self, "merge_report", report), fingerprint=self._fingerprint,
                        merge_options={**self.merge_options, **self._probe_option()}, merged_tensors=tensors)
            if trainer.is_global_zero:
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

