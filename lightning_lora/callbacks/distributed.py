"""``LoRACallback`` under Lightning's ``ModelParallelStrategy`` (FSDP2): adapter-only checkpoints that any world size
resumes.

Lightning's FSDP2 strategy gathers the *whole* model for a full checkpoint (``get_model_state_dict``) or writes every
rank's shard of it (distributed checkpoint), and reloads with the same structure. With a frozen base neither is
wanted: the checkpoint should hold the adapter and its optimizer state only. ``use_adapter_checkpoints`` replaces four
methods on the strategy *instance* (never its class; ``remove_adapter_checkpoints`` takes them off in ``teardown``):

- ``lightning_module_state_dict``: the trainable tensors only, gathered one at a time (``distributed.trainable_state``);
- ``optimizer_state``: the optimizer's state gathered into the layout one process writes;
- ``save_checkpoint``: one ``.ckpt`` file written by rank zero through the strategy's ``checkpoint_io`` (the callback's
  ``AdapterCheckpointIO``: atomic, trimmed), whatever ``save_distributed_checkpoint`` says, since it is adapter-sized;
  then ``after_save`` on every rank (the export of that step, which gathers);
- ``load_checkpoint``: such a file (from any world size or strategy): checked, then each rank copies its shards in;
  the optimizer state goes to the callback, which loads it once the frozen parameters have left the optimizers
  (Lightning reads an FSDP2 checkpoint after ``on_fit_start``, where that happens: ``restore_checkpoint_after_setup``).

So a run saved on 2 GPUs resumes on 1 (any strategy reads the file) and back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from lightning_lora import distributed
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.surgery import adapter_parameters

_UNSUPPORTED = {
    "FSDPStrategy": "FSDP1 flattens each wrapped unit, so frozen base and trainable adapter tensors would share flat "
                    "parameters",
}
_METHODS = ("lightning_module_state_dict", "optimizer_state", "save_checkpoint", "load_checkpoint")


def use_adapter_checkpoints(strategy: Any, frozen_keys: Callable[[], set[str]], check: Callable[[dict], None],
                            after_save: Callable[[], None], pending_optimizer_states: Callable[[list], None]) -> None:
    """Make ``strategy`` (a ``ModelParallelStrategy``) save and load adapter-only checkpoints (module docstring).

    ``frozen_keys()``: the LightningModule's state keys left out; ``check(checkpoint)`` refuses a checkpoint of another
    adapter before anything is loaded; ``after_save()`` runs on every rank once the file is written;
    ``pending_optimizer_states(states)`` loads the optimizer states (once the optimizers hold only trainable
    parameters)."""

    def lightning_module_state_dict() -> dict[str, Any]:
        return distributed.trainable_state(strategy.lightning_module, frozen_keys())

    def optimizer_state(optimizer: Any) -> dict[str, Any]:
        return distributed.optimizer_state(getattr(optimizer, "_optimizer", optimizer))

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        write_adapter_checkpoint(strategy, checkpoint, filepath, storage_options, after_save)

    def load_checkpoint(checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = read_adapter_checkpoint(strategy, checkpoint_path, weights_only, "a distributed (sharded)")
        check(checkpoint)
        distributed.load_trainable(strategy.lightning_module, checkpoint["state_dict"])
        pending_optimizer_states(checkpoint.get("optimizer_states", []))
        return checkpoint

    for name, method in zip(_METHODS, (lightning_module_state_dict, optimizer_state, save_checkpoint, load_checkpoint)):
        strategy.__dict__[name] = method


def remove_adapter_checkpoints(strategy: Any) -> None:
    for name in _METHODS:
        strategy.__dict__.pop(name, None)


def data_parallel_group(strategy: Any) -> Any:
    """The process group over which replicated adapters' gradients are averaged (the data-parallel mesh dimension)."""
    mesh = getattr(strategy, "device_mesh", None)
    return mesh["data_parallel"].get_group() if mesh is not None else None


def tensor_parallel_size(strategy: Any) -> int:
    """The tensor-parallel size a ``ModelParallelStrategy`` will use (``"auto"`` is the number of local devices)."""
    size = getattr(strategy, "_tensor_parallel_size", 1)
    return strategy.num_processes if size == "auto" else int(size)


def check_strategy(unsupported: Optional[str]) -> None:
    """Refuse the strategy ``_lightning.unsupported_strategy`` named (FSDP1), saying why and what to use."""
    if unsupported is not None:
        raise ConfigError(
            f"LoRACallback does not support {unsupported} yet ({_UNSUPPORTED[unsupported]}). Use strategy='ddp' "
            "(adapters are small, so plain data parallelism fits wherever the base model fits on one device), or, to "
            "shard the base, ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with FSDP2 "
            "applied in configure_model (lightning_lora.distributed.shard_model), or strategy='deepspeed_stage_2'/'_3'."
        )


def skipping_updates(configs: dict[str, AdapterConfig]) -> list[str]:
    """The adapters (by name, or method when unnamed) whose update a training step may skip whole, leaving its
    parameters without a gradient on that rank: LoHa/LoKr with ``module_dropout`` (OFT's keeps a gradient)."""
    return [name or config.method for name, config in configs.items()
            if config.method in ("loha", "lokr") and config.module_dropout > 0]


def check_ddp(strategy: Any, adapter_key: Optional[str], configs: dict[str, AdapterConfig]) -> None:
    """Refuse, under a DDP that requires every parameter in every backward, what leaves a rank's adapter parameters
    without a gradient in some step: per-example adapters (``adapter_key``: a rank whose batch holds no example of an
    adapter) and LoHa/LoKr's ``module_dropout``; DDP would stop the fit there."""
    ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)  # Lightning's DDPStrategy (and its subclasses) only
    if ddp_kwargs is None or ddp_kwargs.get("find_unused_parameters", False):
        return
    why = ([f"adapter_key={adapter_key!r}: a rank's batch may hold no example of some adapter"] if adapter_key else []
           ) + [f"{name}'s module_dropout skips its whole update in some steps" for name in skipping_updates(configs)]
    if why:
        raise ConfigError(
            f"LoRACallback under DDP: {'; '.join(why)}, so those adapter parameters get no gradient on that rank and "
            "DDP stops the fit. Use strategy='ddp_find_unused_parameters_true' (or "
            "DDPStrategy(find_unused_parameters=True)): DDP then averages each gradient over the ranks, counting a "
            "rank without one as zero, as one process's mean over the global batch."
        )


def check_routing(model: Any, adapter_key: Optional[str]) -> None:
    """FSDP2, once ``configure_model`` has sharded ``model``: per-example adapters (``adapter_key``) need the adapters
    whole on every rank, since a batch's route keeps each layer's adapter tensors from before the forward, and FSDP2
    swaps gathered ones in for sharded adapters inside each block's forward."""
    if adapter_key is not None and any(distributed.is_dtensor(p) for p in adapter_parameters(model)):
        raise ConfigError(
            f"LoRACallback(adapter_key={adapter_key!r}) under ModelParallelStrategy (FSDP2) needs the adapters whole on "
            "every rank: shard the model with lightning_lora.distributed.shard_model(..., adapters='replicated') in "
            "configure_model (per-example routing keeps each layer's adapter tensors from before the forward, which "
            "FSDP2 replaces by gathered ones for sharded adapters), or train with "
            "strategy='ddp_find_unused_parameters_true'."
        )


def check_fsdp2(strategy: Any, world_size: int, precision: str, merge_options: dict[str, Any], quantize: Any,
                configs: Optional[dict[str, AdapterConfig]] = None) -> None:
    """Refuse, before anything is injected, what the callback does not support under ``ModelParallelStrategy``:
    tensor parallelism, LoHa/LoKr's module dropout, a merge target other than dequantized, a true-half cast of a
    quantized base, and packed int4 (per-example adapters need replicated ones: ``check_routing``). Every method, and
    several named adapters, train under FSDP2 with adapters sharded or replicated (tests/test_fsdp.py)."""
    tp = tensor_parallel_size(strategy)
    if tp != 1:
        raise ConfigError(
            f"LoRACallback supports ModelParallelStrategy as FSDP2 data parallelism only, and this one has "
            f"tensor_parallel_size={tp}: pass ModelParallelStrategy(data_parallel_size={world_size}, "
            "tensor_parallel_size=1) (tensor-parallel adapted layers are not supported)."
        )
    skipping = skipping_updates(configs or {})
    if skipping:
        raise ConfigError(
            f"LoRACallback under ModelParallelStrategy (FSDP2): {', '.join(skipping)} set module_dropout, which "
            "skips a layer's whole update in some steps, drawn on each rank; a rank that skips has no gradient for "
            "it, and FSDP2's gradient reduction needs the same gradients from every rank. Set module_dropout=0 "
            "(rank_dropout is fine), or train with strategy='ddp_find_unused_parameters_true'."
        )
    if merge_options.get("merge_target", "dequantized") != "dequantized":
        raise ConfigError(
            f"LoRACallback(merge_target={merge_options['merge_target']!r}) is not available under "
            "ModelParallelStrategy: the sharded merged export writes the 'dequantized' target (dequant(Wq) + dW, "
            "one gathered weight at a time). Drop merge_target, or merge the saved adapter on one device with "
            "lightning_lora.quantize_merge."
        )
    if quantize is not None and precision in ("bf16-true", "16-true"):
        raise ConfigError(
            f"LoRACallback(quantize=...) under ModelParallelStrategy with precision={precision!r}: the cast of the "
            "sharded model would dequantize the base. Use precision='bf16-mixed' (or '32-true' with "
            "shard_model(..., mp_policy=MixedPrecisionPolicy(...)))."
        )
    if getattr(quantize, "format", None) == "int4" and quantize.packing in ("auto", "packed"):
        raise ConfigError(  # lightning_lora.int4.PackedInt4Tensor has no split/all-gather for FSDP2 to shard it
            "LoRACallback(quantize=int4) under ModelParallelStrategy: the packed int4 layout cannot be sharded yet. "
            "Use quantize='nf4' (FSDP2 shards torchao's NF4), or strategy='ddp'."
        )


def write_adapter_checkpoint(strategy: Any, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any],
                             after_save: Callable[[], None]) -> None:
    """Rank zero writes the adapter-only checkpoint every rank took part in building (the gathers are collectives);
    every rank waits for the file, then runs ``after_save`` (FSDP2 and DeepSpeed alike)."""
    path = strategy.broadcast(filepath)
    if strategy.is_global_zero:
        strategy.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
    strategy.barrier("lightning_lora_checkpoint")
    after_save()


def read_adapter_checkpoint(strategy: Any, checkpoint_path: Any, weights_only: Optional[bool], kind: str
                            ) -> dict[str, Any]:
    """The ``.ckpt`` file rank zero's path names, read on every rank; a strategy's own checkpoint directory (``kind``:
    what wrote it) is refused, since only adapter-only files this callback wrote can resume. Tensors only
    (``weights_only=True``) unless the caller asked otherwise: loading never runs code."""
    path = Path(strategy.broadcast(checkpoint_path))
    if path.is_dir():
        raise ValueError(
            f"{path} is {kind} checkpoint directory; LoRACallback writes and resumes adapter-only checkpoints, one "
            ".ckpt file from any world size. Resume from a checkpoint this callback wrote, or load the adapter with "
            "lightning_lora.load_adapter and start a new fit."
        )
    return strategy.checkpoint_io.load_checkpoint(path, weights_only=True if weights_only is None else weights_only)
