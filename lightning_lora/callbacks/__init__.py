"""Lightning glue: the callback that injects, freezes, trims checkpoints, resumes and exports."""

from lightning_lora.callbacks.lora_callback import LoRACallback

__all__ = ["LoRACallback"]
