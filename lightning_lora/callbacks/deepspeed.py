"""``LoRACallback`` under Lightning's ``DeepSpeedStrategy`` (ZeRO stages 2 and 3): adapter-only checkpoints.

Lightning's DeepSpeed strategy writes DeepSpeed's own checkpoint directory: the module's state dict (the whole frozen
base under stage 2; under stage 3 empty placeholders of every partitioned tensor, adapters included: peft #2892) and
each rank's ZeRO partitions, which resume only on the same world size. With a frozen base the checkpoint should hold
the adapter and its optimizer state only, so ``use_adapter_checkpoints`` replaces, on the strategy *instance* (never
its class; ``remove_adapter_checkpoints`` takes them off in ``teardown``):

- ``_setup_model_and_optimizer`` (where Lightning calls ``deepspeed.initialize``): the frozen parameters leave the
  optimizer's groups first (and LoRA+ splits them), so ZeRO flattens and partitions the adapter only, and the groups
  are recorded (one process's parameter order, for the optimizer state);
- ``lightning_module_state_dict`` / ``optimizer_state``: whole float32 adapter tensors and Adam state, one tensor at a
  time, in one process's layout (``lightning_lora.deepspeed_io``);
- ``save_checkpoint``: one ``.ckpt`` file written by rank zero through the strategy's ``checkpoint_io`` (the callback's
  ``AdapterCheckpointIO``: atomic, trimmed), then ``after_save`` on every rank (the export of that step, a collective);
- ``load_checkpoint``: such a file from any world size or strategy, checked, then copied into the partitions and the
  ZeRO optimizer (DeepSpeed reads the checkpoint after ``deepspeed.initialize``: ``restore_checkpoint_after_setup``);
  ``load_model_state_dict``: nothing left to do.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from lightning_lora import deepspeed_io
from lightning_lora.callbacks.distributed import read_adapter_checkpoint, skipping_updates, write_adapter_checkpoint
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.methods.registry import method_spec

_METHODS = ("_setup_model_and_optimizer", "lightning_module_state_dict", "optimizer_state", "save_checkpoint",
            "load_checkpoint", "load_model_state_dict")


def zero_stage(strategy: Any) -> int:
    """The ZeRO stage of a ``DeepSpeedStrategy`` (0 when its config has no ``zero_optimization``)."""
    config = getattr(strategy, "config", None) or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def check_deepspeed(strategy: Any, configs: dict[str, AdapterConfig], adapter_key: Optional[str], quantize: Any,
                    compile_enabled: Optional[bool], merge_options: Optional[dict[str, Any]] = None, *,
                    accumulate: int = 1) -> None:
    """Refuse, before anything is injected, what the callback does not support under ``DeepSpeedStrategy``. Every
    method of the registry, one adapter or several named ones, trains under ZeRO-2 and ZeRO-3 as in one process
    (tests/test_deepspeed.py); refused is what may leave a rank's adapter tensor without a gradient in a step, and a
    method's training-loop hooks with gradient accumulation (``accumulate``: the Trainer's accumulate_grad_batches)."""
    stage = zero_stage(strategy)
    fix = "Use strategy='ddp', or ModelParallelStrategy with FSDP2 (lightning_lora.distributed.shard_model)"
    if stage not in (2, 3):
        raise ConfigError(
            f"LoRACallback under DeepSpeedStrategy supports ZeRO stages 2 and 3 (strategy='deepspeed_stage_2' or "
            f"'deepspeed_stage_3'), not stage {stage}: stages 0-1 are not tested here. {fix}."
        )
    why = ([f"adapter_key={adapter_key!r}: a rank's batch may hold no example of some adapter"] if adapter_key else []
           ) + [f"{name}'s module_dropout skips its whole update in some steps" for name in skipping_updates(configs)]
    if why:
        raise ConfigError(
            f"LoRACallback under DeepSpeedStrategy: {'; '.join(why)}, so those adapter parameters get no gradient on "
            "that rank, which ZeRO's gradient partitioning is not tested with. Drop adapter_key (train the adapters "
            "one after another) and set module_dropout=0, or use strategy='ddp_find_unused_parameters_true'."
        )
    hooked = sorted({c.method for c in configs.values() if method_spec(c.method).regularization is not None
                     or method_spec(c.method).after_step is not None})
    if accumulate > 1 and hooked:
        raise ConfigError(
            f"LoRACallback under DeepSpeedStrategy with accumulate_grad_batches={accumulate}: {', '.join(hooked)} "
            "runs a hook at each optimizer step (a regularizer's gradient, AdaLoRA's rank allocation), and under "
            "DeepSpeed Lightning calls it at every batch (DeepSpeed accumulates inside its step), so it would run "
            f"{accumulate} times per step. Set accumulate_grad_batches=1 (a larger batch per device instead), or use "
            "strategy='ddp'."
        )
    check_quantized(strategy, quantize, merge_options or {})
    if compile_enabled:
        raise ConfigError(
            "LoRACallback(compile=...) under DeepSpeedStrategy: the regional compile is not tested under ZeRO (stage "
            "3 gathers each parameter in hooks around every module). Drop compile= (it is off under DeepSpeed), or "
            "use strategy='ddp'."
        )


def check_quantized(strategy: Any, quantize: Any, merge_options: dict[str, Any]) -> None:
    """A quantized base trains under ZeRO through ``LoRACallback(quantize=...)`` (``deepspeed_quantized.py``); refuse
    the ``QuantizedPrecision`` plugin and a merged export of another target than the one ZeRO's gather writes."""
    from lightning_lora.plugins.precision import QuantizedPrecision

    if isinstance(getattr(strategy, "precision_plugin", None), QuantizedPrecision):
        raise ConfigError(
            "Trainer(plugins=[QuantizedPrecision(...)]) under DeepSpeedStrategy: the plugin takes the place of "
            "Lightning's DeepSpeedPrecision, whose backward and optimizer step run through the DeepSpeed engine (ZeRO "
            "reduces the gradients there), so ZeRO would not train correctly. Quantize with the callback instead: "
            "LoRACallback(quantize='nf4') and Trainer(precision=...), without the plugin."
        )
    target = merge_options.get("merge_target", "dequantized")
    if quantize is not None and target != "dequantized":
        raise ConfigError(
            f"LoRACallback(merge_target={target!r}) is not available under DeepSpeedStrategy: the merged export "
            "there writes the 'dequantized' target (dequant(Wq) + dW, one weight at a time). Drop merge_target, or "
            "merge the saved adapter on one device with lightning_lora.quantize_merge."
        )


def refuse_late_model(err: ConfigError) -> ConfigError:
    """The injection failed because the model does not exist yet, under ZeRO-3 (where ``configure_model`` runs
    inside ``deepspeed.zero.Init``, which partitions each parameter as it is created)."""
    return ConfigError(
        f"{err} Under DeepSpeed ZeRO stage 3 the adapters are injected before configure_model, which runs inside "
        "deepspeed.zero.Init (it partitions every parameter created there, so an adapter built later could not be "
        "initialized or targeted): build the model in __init__, or use strategy='deepspeed_stage_2'."
    )


def use_adapter_checkpoints(strategy: Any, frozen_keys: Callable[[], set[str]], check: Callable[[dict], None],
                            after_save: Callable[[], None],
                            split_groups: Optional[Callable[[Any, Any], Any]] = None) -> None:
    """Make ``strategy`` (a ``DeepSpeedStrategy``) train only the adapter and save and load adapter-only checkpoints
    (module docstring). ``frozen_keys()``: the LightningModule's state keys left out; ``check(checkpoint)`` refuses
    a checkpoint of another adapter before anything is loaded; ``after_save()`` runs on every rank once the file is
    written; ``split_groups(optimizer, lr_scheduler)`` (LoRA+) regroups the trainable parameters before ZeRO
    flattens them, as the callback does after pruning in one process."""
    groups: list[list[nn.Parameter]] = []  # the optimizer's trainable parameters, as one process numbers them
    options: list[dict[str, Any]] = []  # its live group dicts (learning rates a scheduler changes)
    setup = strategy._setup_model_and_optimizer

    def setup_model_and_optimizer(model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> Any:
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p.requires_grad]
            if split_groups is not None:
                split_groups(optimizer, lr_scheduler)
            groups[:] = [list(group["params"]) for group in optimizer.param_groups]
            options[:] = list(optimizer.param_groups)
        return setup(model, optimizer, lr_scheduler)

    def lightning_module_state_dict() -> dict[str, Any]:
        return deepspeed_io.trainable_state(strategy.lightning_module, frozen_keys())

    def optimizer_state(optimizer: Any) -> dict[str, Any]:
        return deepspeed_io.optimizer_state(getattr(optimizer, "_optimizer", optimizer), groups, options)

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        write_adapter_checkpoint(strategy, checkpoint, filepath, storage_options, after_save)

    def load_checkpoint(checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = read_adapter_checkpoint(strategy, checkpoint_path, weights_only, "a DeepSpeed")
        check(checkpoint)
        states = checkpoint.get("optimizer_states") or []
        fitting = bool(states and strategy.optimizers and groups)  # the ZeRO optimizer exists (restore after setup)
        if fitting:
            deepspeed_io.check_optimizer_state(groups, states[0])
        deepspeed_io.load_trainable(strategy.lightning_module, checkpoint["state_dict"])
        if fitting:
            deepspeed_io.load_optimizer_state(strategy.optimizers[0], groups, options, states[0])
        return checkpoint

    def load_model_state_dict(checkpoint: Any, strict: bool = True) -> None:
        pass  # load_checkpoint has copied the adapter in

    for name, method in zip(_METHODS, (setup_model_and_optimizer, lightning_module_state_dict, optimizer_state,
                                       save_checkpoint, load_checkpoint, load_model_state_dict)):
        strategy.__dict__[name] = method


def remove_adapter_checkpoints(strategy: Any) -> None:
    for name in _METHODS:
        strategy.__dict__.pop(name, None)
