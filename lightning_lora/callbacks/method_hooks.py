"""Each method's training-loop hooks (``MethodSpec.regularization`` before the optimizer step, ``after_step`` after it:
AdaLoRA's rank allocation, the AdaLoRA/HRA orthogonality terms), run once per step for every method in the run, on
whole adapter tensors and gradients whatever the strategy:

- one process and DDP: the tensors as they are;
- FSDP2: ``distributed.whole_trainable`` gathers a method's sharded adapters and copies each rank's shard back;
- DeepSpeed: ``deepspeed_io.whole_trainable`` reads ZeRO's partitions. ZeRO keeps gradients there, never in ``.grad``,
  and drops them at its step, so they are read before the step (for ``after_step`` too) and kept until the batch ends.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

from torch import nn

from lightning_lora import deepspeed_io, distributed
from lightning_lora.config import AdapterConfig
from lightning_lora.methods.registry import method_spec
from lightning_lora.surgery import adapters


class MethodHooks:
    """The training-loop hooks of the methods in ``configs`` (named adapters may mix methods; a method's hooks act on
    all of its adapters). ``strategy``: ``"deepspeed"``, ``"fsdp2"`` or anything else (tensors used as they are)."""

    def __init__(self, configs: dict[str, AdapterConfig], strategy: str) -> None:
        self.specs = [method_spec(m) for m in dict.fromkeys(c.method for c in configs.values())]
        self.strategy = strategy
        self._stepped = False  # an optimizer step ran in this batch (after_step runs only then)
        self._zero_grads: dict = {}  # DeepSpeed: whole gradients read before the step, for after_step

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Each regularizer's gradient joins the (unscaled, all-reduced) loss gradient."""
        for spec in self.specs:
            if spec.regularization is not None or (self.strategy == "deepspeed" and spec.after_step is not None):
                with self._whole(model, spec):
                    term = spec.regularization(adapters(model)) if spec.regularization is not None else None
                    if term is not None:
                        term.backward()
        self._stepped = True

    def after_batch(self, model: nn.Module, step: int, total_steps: int) -> None:
        """``after_step`` (after the optimizer step, gradients not yet cleared) when a step ran in this batch."""
        for spec in self.specs if self._stepped else ():
            if spec.after_step is not None:
                with self._whole(model, spec):
                    spec.after_step(adapters(model), step, total_steps)
        self._stepped = False
        self._zero_grads.clear()

    def _whole(self, model: nn.Module, spec: Any) -> ContextManager:
        if self.strategy == "deepspeed":
            return deepspeed_io.whole_trainable(distributed.method_modules(model, spec.name), self._zero_grads)
        if self.strategy == "fsdp2":
            return distributed.whole_trainable(distributed.method_modules(model, spec.name))
        return contextlib.nullcontext()
