"""Atomic writes: at a final path there is always either the previous complete file or export, or the new one.

Two tools, both for data the user keeps:

- ``atomic_file``: one file, written under a hidden temporary name beside it, flushed and fsynced, then renamed over
  the final name, and the directory fsynced so that the rename itself survives a power cut.
- ``export_directory``: a whole export (several files) staged in a hidden directory beside the target, then swapped
  into place. On Linux the swap is ``renameat2(RENAME_EXCHANGE)``, so the final path never goes missing; elsewhere
  (or where the filesystem refuses it) the old export is renamed aside first and, if the process dies between the two
  renames, restored by the next write to the same place.

An export writes a small manifest (``.lightning_lora.json``) listing its files, so that a later export knows the
directory is its own to replace; a directory holding anything else is refused, never emptied. Temporary names are
``.<name>.tmp-*`` and ``.<name>.old-*``; leftovers of a killed writer are removed by the next write to the same
target (one writer per target at a time). The process umask is never changed (threads share it): files and
directories are created with modes 0o666/0o777 and the kernel applies the umask.

Write failures (``OSError``, and safetensors' ``SafetensorError``, which is not one) become ``ExportError``, an
``OSError`` whose message names the path and the cause, so that ``except OSError`` catches a full disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Union

try:
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover - safetensors is a dependency; this keeps the module importable alone
    SafetensorError = OSError  # type: ignore[assignment,misc]

PathLike = Union[str, os.PathLike]

MANIFEST = ".lightning_lora.json"
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class ExportError(OSError):
    """A file or export could not be written; whatever was at the final path before is still there, unchanged.

    An ``OSError`` (with ``errno`` and ``filename`` set where known) so that ``except OSError`` catches it."""

    def __init__(self, message: str, code: Optional[int] = None, filename: Optional[PathLike] = None) -> None:
        super().__init__(message)
        self.errno = code
        self.filename = None if filename is None else os.fspath(filename)

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def disk_full(self) -> bool:
        """True when the write failed for lack of space (ENOSPC, EFBIG: a file size limit, EDQUOT: a quota)."""
        return self.errno in DISK_FULL


class ExportTargetError(ExportError):
    """The target path is in the way of an export (a file, or a directory holding files that are not ours); nothing
    was written and nothing was deleted."""


# -- write failures ------------------------------------------------------------------------------------------------
def _errno_of(err: BaseException) -> Optional[int]:
    code = getattr(err, "errno", None)
    if isinstance(code, int):
        return code
    match = re.search(r"os error (\d+)", str(err))  # SafetensorError carries the OS error only in its text
    return int(match.group(1)) if match else None


def write_failure(err: BaseException, what: str, target: PathLike, existed: bool) -> ExportError:
    """An ``ExportError`` for ``err`` raised while writing ``what`` to ``target``: names the path, the cause and
    what is at the final path now."""
    code = _errno_of(err)
    cause = "the disk is full (or a file size limit or quota was reached)" if code in DISK_FULL else "the write failed"
    kept = f"the previous {what} at {target} is unchanged" if existed else f"nothing was written at {target}"
    return ExportError(f"Could not write the {what} to {target}: {cause} ({err}); {kept}. "
                       + ("Free some space or choose another directory." if code in DISK_FULL else
                          "Check that the directory is writable and retry."), code, target)


# -- small durable steps -------------------------------------------------------------------------------------------
def fsync_path(path: PathLike) -> None:
    """fsync a file or directory by path (a directory's fsync makes the renames inside it durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory; the data itself was fsynced
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE). False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc older than 2.28, or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # kernel or filesystem without the flag
        return False
    raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


def _temp_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"


def _leftovers(target: Path) -> list[Path]:
    if not target.parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefixes))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _make_parents(directory: Path) -> None:
    """Create ``directory`` and its missing parents, making each new entry durable in its parent."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o777)
        fsync_path(path.parent)


def _new_file_mode(probe: Path) -> int:
    """The mode ``open()`` gives a new file here (0o666 & ~umask), read without ``os.umask``, which would change the
    umask of every thread for a moment. Some writers (safetensors) create owner-only files; exports are for sharing."""
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        return os.stat(probe).st_mode & 0o777
    finally:
        os.unlink(probe)


# -- one file ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(target: PathLike, what: str = "file") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``target``; when the block returns, the file written there is fsynced and
    renamed over ``target`` (then the directory is fsynced). On error ``target`` is untouched, the temporary file is
    removed, and write errors are raised as ``ExportError``. ``what`` names the file in error messages."""
    target = Path(target)
    existed = target.exists()
    _make_parents(target.parent)
    for leftover in _leftovers(target):
        _remove(leftover)
    temp = _temp_name(target, "tmp")
    try:
        mode = _new_file_mode(temp)
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield temp
        os.chmod(temp, mode)  # a writer may have replaced the file with an owner-only one
        fsync_path(temp)
        os.replace(temp, target)
        fsync_path(target.parent)
    except (OSError, SafetensorError) as err:
        raise write_failure(err, what, target, existed) from err
    finally:
        _remove(temp)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON (not atomic by itself: use it inside a staging directory)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- whole exports -------------------------------------------------------------------------------------------------
def read_manifest(directory: PathLike) -> Optional[dict[str, Any]]:
    """The manifest of an export we wrote into ``directory``, or None when there is none or it is unreadable."""
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list) or not isinstance(data.get("kind"), str):
        return None
    if not all(isinstance(f, str) for f in data["files"]):
        return None
    return data


def _is_complete(directory: Path) -> bool:
    manifest = read_manifest(directory)
    return manifest is not None and all((directory / f).is_file() for f in manifest["files"])


def recover_export(target: PathLike) -> None:
    """Finish what a killed writer left at ``target``: if the final path is missing but a complete previous export
    was renamed aside (``.<name>.old-*``), put it back; then remove every leftover temporary name of ``target``."""
    target = Path(target)
    leftovers = _leftovers(target)
    if not os.path.lexists(target):
        aside = [p for p in leftovers if p.name.startswith(f".{target.name}.old-") and _is_complete(p)]
        if aside:
            newest = max(aside, key=lambda p: p.stat().st_mtime_ns)
            os.rename(newest, target)
            fsync_path(target.parent)
            leftovers.remove(newest)
    for leftover in leftovers:
        _remove(leftover)


def _working_directory() -> Optional[Path]:
    try:
        return Path.cwd().resolve()
    except FileNotFoundError:  # deleted under us: then it cannot be the target either
        return None


def check_export_target(target: PathLike, kind: str) -> None:
    """Refuse (``ExportTargetError``) a ``target`` that an export of ``kind`` may not replace: a file, the working
    directory (or one holding it), or a directory holding anything that our manifest does not list. An empty
    directory, a missing one and a previous export of the same kind are fine. Writes nothing."""
    target = Path(target)
    fix = "Choose a new or empty directory, or remove those files."
    if os.path.lexists(target) and not target.is_dir():
        raise ExportTargetError(f"Cannot write the {kind} export to {target}: it is a file, not a directory. "
                                "Choose a new or empty directory, or remove that file.", errno.ENOTDIR, target)
    if not target.is_dir():
        ancestor = next((a for a in target.absolute().parents if os.path.lexists(a)), None)
        if ancestor is not None and not ancestor.is_dir():
            raise ExportTargetError(f"Cannot write the {kind} export to {target}: {ancestor} is a file, not a "
                                    "directory. Choose another path.", errno.ENOTDIR, target)
        return
    cwd = _working_directory()
    if cwd is not None and (cwd == target.resolve() or target.resolve() in cwd.parents):
        raise ExportTargetError(
            f"Cannot write the {kind} export to {str(target)!r} ({target.resolve()}): it is (or holds) the current "
            "working directory, and an export replaces its directory as a whole, which would leave this process in "
            "a deleted directory. "
            f"Write into a subdirectory instead, e.g. {os.path.join(target, kind)!r}.", errno.EBUSY, target)
    entries = sorted(os.listdir(target))
    if not entries:
        return
    manifest = read_manifest(target)
    listed = set() if manifest is None else {f.split("/")[0] for f in manifest["files"]} | {MANIFEST}
    foreign = [e for e in entries if e not in listed]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportTargetError(
            f"Cannot write the {kind} export to {target}: it holds files that are not from a lightning_lora export "
            f"({shown}); an export replaces its directory as a whole and never deletes other files. {fix}",
            errno.EEXIST, target)
    if manifest is not None and manifest["kind"] != kind:
        raise ExportTargetError(
            f"Cannot write the {kind} export to {target}: it holds a previous {manifest['kind']} export, which this "
            f"would delete. Choose another directory for the {kind} export, or remove that one.", errno.EEXIST, target)


@contextlib.contextmanager
def export_directory(target: PathLike, kind: str) -> Iterator[Path]:
    """Yield an empty hidden staging directory beside ``target``; when the block returns, write the manifest, fsync
    everything, and swap the staging directory into place as ``target`` (the previous export, if any, is removed).

    ``kind`` names the export ("adapter", "merged"): a directory holding another kind, or files that are not ours,
    is refused before anything is written (see ``check_export_target``). On any error ``target`` is unchanged and
    the staging directory is removed; write errors are raised as ``ExportError``."""
    target = Path(target)
    if target.is_symlink():  # replace what the link points to, not the link
        target = Path(os.path.realpath(target))
    if target.parent.is_dir():
        recover_export(target)
    check_export_target(target, kind)
    existed = target.is_dir()
    staging: Optional[Path] = None
    try:
        _make_parents(target.parent)
        staging = _temp_name(target, "tmp")
        os.mkdir(staging, 0o777)  # 0o777 & ~umask, as a plain mkdir gives: exports are for sharing
        yield staging
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        mode = _new_file_mode(staging / MANIFEST)
        for name in files:
            os.chmod(staging / name, mode)
        write_json(staging / MANIFEST, {"kind": kind, "files": files, "writer": "lightning_lora"})
        for path in sorted(staging.rglob("*"), key=lambda p: -len(p.parts)):  # files, then directories bottom-up
            fsync_path(path)
        fsync_path(staging)
        check_export_target(target, kind)  # again: files may have appeared there while we wrote
        _swap_in(staging, target)
    except (OSError, SafetensorError) as err:
        if isinstance(err, ExportError):
            raise
        raise write_failure(err, f"{kind} export", target, existed) from err
    finally:
        if staging is not None:
            _remove(staging)


def _swap_in(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; the previous export ends up at ``staging`` (removed by the caller) or aside."""
    if not target.exists():
        os.rename(staging, target)
    elif not _exchange(staging, target):
        aside = _temp_name(target, "old")
        os.rename(target, aside)  # a kill here leaves the final path missing; recover_export puts ``aside`` back
        os.rename(staging, target)
        _remove(aside)
    fsync_path(target.parent)
