"""The callback's exports on disk: one directory per checkpoint step, and the final ``adapter/`` + ``merged/`` pair.

- ``export_step``: ``<root>/step-<N>/{adapter,merged}`` appears as a whole (staged beside it, then swapped in), so a
  kill never leaves an empty or half-filled ``step-<N>``.
- ``export_final``: ``<root>/adapter`` and ``<root>/merged`` are a pair from one step. Both are written into a staging
  directory first (a full disk fails there, with nothing at the final paths changed); the staging directory is then
  renamed to a journal (``.lightning_lora-final``, the commit point) that records which directories it holds, and each
  is swapped into place. A kill between the two swaps is finished by the next export into the same root
  (``finish_final``, also run when the callback starts), so the pair is never left from two steps.

No Lightning here: the callback decides when, this module how.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from torch import Tensor, nn

from lightning_lora import distributed
from lightning_lora.atomic import ExportError, check_export_target, export_directory, fsync_path, recover_export
from lightning_lora.atomic import _exchange  # renameat2(RENAME_EXCHANGE) where the kernel has it
from lightning_lora.export import export_merged
from lightning_lora.io import save_adapter
from lightning_lora.quantize_merge import MergeReport
from lightning_lora.sharded_export import drain, merged_tensors, write_merged

JOURNAL = ".lightning_lora-final"
STEP_KIND = "checkpoint export"
_LEFTOVER = re.compile(r"^\.(step-\d+)\.(tmp|old)-[0-9a-f]+$")


def tokenizer_of(module: Any) -> Any:
    """``module.tokenizer`` if it can ``save_pretrained`` (so the merged export is a standalone model), else None."""
    tokenizer = getattr(module, "tokenizer", None)
    return tokenizer if callable(getattr(tokenizer, "save_pretrained", None)) else None


@contextlib.contextmanager
def gathered_export(model: nn.Module, sharded: bool, merged: bool) -> Iterator[Optional[Iterable[tuple[str, Tensor]]]]:
    """Collective, on every rank: under FSDP2 (``sharded``) gather the adapter tensors (only those) and yield the
    ``merged_tensors`` iterator rank zero writes a merged export from (``merged``), run to its end on leaving so every
    rank finishes its gathers; otherwise yield None."""
    if not sharded:
        yield None
        return
    with distributed.gathered_adapters(model):
        tensors = merged_tensors(model) if merged else None
        try:
            yield tensors
        finally:
            drain(tensors)  # the other ranks' share of the per-tensor gathers, and whatever rank zero left


def _write(model: nn.Module, directory: Path, merged: bool, tokenizer: Any,
           report: Optional[Callable[[MergeReport], None]] = None, fingerprint: Optional[str] = None,
           merge_options: Optional[dict[str, Any]] = None,
           merged_tensors: Optional[Iterable[tuple[str, Tensor]]] = None) -> tuple[Path, Optional[Path]]:
    adapter_dir = save_adapter(model, directory / "adapter", fingerprint)
    if merged and merged_tensors is not None:  # a base sharded by FSDP2: merged a tensor at a time (sharded_export)
        return adapter_dir, write_merged(model, directory / "merged", merged_tensors, tokenizer)
    merged_dir = (export_merged(model, directory / "merged", tokenizer, report, **(merge_options or {}))
                  if merged else None)
    return adapter_dir, merged_dir


def export_step(model: nn.Module, directory: Path, merged: bool, tokenizer: Any = None,
                fingerprint: Optional[str] = None, merge_options: Optional[dict[str, Any]] = None,
                merged_tensors: Optional[Iterable[tuple[str, Tensor]]] = None) -> None:
    """Write ``directory/adapter`` (and ``directory/merged``) as one atomic directory; ``merge_options`` go to
    ``export_merged`` (``merge_target``, ``original``); ``fingerprint`` and ``merged_tensors`` as for
    ``export_final``."""
    with export_directory(directory, STEP_KIND) as staging:
        _write(model, staging, merged, tokenizer, fingerprint=fingerprint, merge_options=merge_options,
               merged_tensors=merged_tensors)


def export_final(model: nn.Module, root: Path, merged: bool, tokenizer: Any = None,
                 report: Optional[Callable[[MergeReport], None]] = None, fingerprint: Optional[str] = None,
                 merge_options: Optional[dict[str, Any]] = None,
                 merged_tensors: Optional[Iterable[tuple[str, Tensor]]] = None) -> tuple[Path, Optional[Path]]:
    """Write ``root/adapter`` and ``root/merged`` as a pair (see the module docstring); returns their paths. A merge
    from a quantized base hands its ``MergeReport`` to ``report`` (``export_merged``). For a base sharded by FSDP2,
    ``fingerprint`` is the base fingerprint taken before sharding and ``merged_tensors`` the collective
    ``sharded_export.merged_tensors`` iterator the merged export is written from.

    Raises ``ExportError`` naming ``root`` if the write fails; the previous pair is then unchanged."""
    root = Path(root)
    finish_final(root)
    names = ["adapter"] + (["merged"] if merged else [])
    for name in names:  # refuse a user's directory before writing anything
        check_export_target(root / name, name)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".final.tmp-{secrets.token_hex(4)}"
    try:
        os.mkdir(staging, 0o777)
        _write(model, staging, merged, tokenizer, report, fingerprint, merge_options, merged_tensors)
        inodes = {name: os.stat(staging / name).st_ino for name in names}
        (staging / "inodes.json").write_text(json.dumps(inodes), encoding="utf-8")
        fsync_path(staging / "inodes.json")
        fsync_path(staging)
        os.rename(staging, root / JOURNAL)  # the commit point
        fsync_path(root)
    except OSError as err:
        raise ExportError(
            f"The final export to {root} failed: {str(err).rstrip('.')}. The previous adapter/ and merged/ there "
            "(if any) are unchanged, and the last checkpoint holds the trained adapter: free some space and export it with "
            "lightning_lora.save_adapter / export_merged, or resume from the checkpoint.",
            getattr(err, "errno", None), root) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    finish_final(root)
    return root / "adapter", (root / "merged" if merged else None)


def finish_final(root: Path) -> None:
    """Complete a committed final export that a kill interrupted, and remove leftover staging names in ``root``."""
    root = Path(root)
    if not root.is_dir():
        return
    journal = root / JOURNAL
    if journal.is_dir():
        inodes = json.loads((journal / "inodes.json").read_text(encoding="utf-8"))
        for name, inode in inodes.items():
            staged, target = journal / name, root / name
            if not staged.is_dir() or os.stat(staged).st_ino != inode:
                continue  # already swapped in (what is left there is the previous export)
            if not target.exists():
                os.rename(staged, target)
            elif not _exchange(staged, target):
                aside = journal / f"{name}.old"
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(target, aside)  # a kill here: target is missing, staged still holds the new one: redone
                os.rename(staged, target)
            fsync_path(root)
        trash = root / f".final.tmp-{secrets.token_hex(4)}"
        os.rename(journal, trash)  # gone in one step: a kill during the removal cannot leave half a journal
        shutil.rmtree(trash, ignore_errors=True)
    for entry in os.listdir(root):
        if entry.startswith(".final.tmp-"):
            shutil.rmtree(root / entry, ignore_errors=True)
        else:
            match = _LEFTOVER.match(entry)
            if match:
                with contextlib.suppress(OSError):
                    recover_export(root / match.group(1))
