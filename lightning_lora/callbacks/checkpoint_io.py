"""``AdapterCheckpointIO``: the checkpoint writer ``LoRACallback`` installs through ``trainer.strategy.checkpoint_io``.

It wraps the strategy's writer and does three things on every checkpoint, whatever path led to the write
(``ModelCheckpoint``, ``save_weights_only=True`` which skips callbacks' hooks, or ``trainer.save_checkpoint``):

- ``prepare(checkpoint)`` (the callback's) drops the frozen base tensors, so every checkpoint is adapter-sized;
- a local file is written atomically: Lightning's ``TorchCheckpointIO`` opens the final path for writing, so a kill
  mid-write leaves a truncated ``.ckpt``; here it writes a hidden temporary name beside it, which is fsynced and
  renamed over the final name (``lightning_lora.atomic.atomic_file``);
- ``after_save()`` (the callback's) runs once the file is complete, so an export follows its checkpoint, never
  precedes it: a full disk loses the export, not the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Callable, Optional

from typing_extensions import override

from lightning_lora.atomic import atomic_file
from lightning_lora.callbacks._lightning import CHECKPOINT_IO_BASES, is_torch_checkpoint_io


def _is_local(path: Any) -> bool:
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


_LEFTOVER = re.compile(r"^\..+\.ckpt\.tmp-[0-9a-f]+$")


def _remove_leftovers(directory: str) -> None:
    """Remove temporary checkpoint files a killed writer left in ``directory`` (one writer per directory: rank zero,
    synchronously); ``atomic_file`` cleans only those of the name it writes, and step names are not written twice."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if _LEFTOVER.match(entry):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))


class AdapterCheckpointIO(*CHECKPOINT_IO_BASES):  # type: ignore[misc]
    """Wraps ``checkpoint_io``: trims each checkpoint with ``prepare``, writes local files atomically, then calls
    ``after_save``. Loading and removal are the wrapped writer's."""

    def __init__(self, checkpoint_io: Any, prepare: Callable[[dict[str, Any]], None],
                 after_save: Callable[[], None]) -> None:
        self.checkpoint_io = checkpoint_io
        self.prepare = prepare
        self.after_save = after_save

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        self.prepare(checkpoint)
        if is_torch_checkpoint_io(self.checkpoint_io) and _is_local(path):
            local = os.fspath(path).removeprefix("file://")
            _remove_leftovers(os.path.dirname(local) or ".")
            with atomic_file(local, what="checkpoint") as temp:
                self.checkpoint_io.save_checkpoint(checkpoint, temp, storage_options=storage_options)
        else:  # remote or custom writers (e.g. AsyncCheckpointIO) keep their own write semantics
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.after_save()

    @override
    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
                        ) -> dict[str, Any]:
        # Loading never executes code: checkpoints of ours hold tensors and plain data only, so the unpickler is the
        # restricted one unless the caller turned it off explicitly (older torch defaults None to full unpickling).
        kwargs = {} if map_location is None else {"map_location": map_location}
        return self.checkpoint_io.load_checkpoint(path, weights_only=True if weights_only is None else weights_only,
                                                  **kwargs)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.checkpoint_io.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.checkpoint_io.teardown()
