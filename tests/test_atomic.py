"""lightning_lora.atomic on real files: atomic single files, whole-export swaps, recovery after a kill between the
fallback's two renames, leftovers cleaned, targets that are not ours refused, and the umask left alone."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path

import pytest

import lightning_lora.atomic as atomic
from lightning_lora.atomic import (
    MANIFEST,
    ExportError,
    ExportTargetError,
    atomic_file,
    check_export_target,
    export_directory,
    read_manifest,
    recover_export,
)


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def export(target: Path, text: str, kind: str = "adapter", names: tuple[str, ...] = ("a.txt", "b.txt")) -> None:
    with export_directory(target, kind) as staging:
        for name in names:
            (staging / name).write_text(text)


def contents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def plain_file_mode(directory: Path) -> int:
    """The mode ``open()`` gives a new file here under this process's umask."""
    probe = directory / "probe"
    probe.write_text("")
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


@pytest.fixture
def exchange_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record what each renameat2 exchange returned (True: swapped in one step)."""
    calls: list[bool] = []
    real = atomic._exchange

    def recording(a: Path, b: Path) -> bool:
        calls.append(real(a, b))
        return calls[-1]

    monkeypatch.setattr(atomic, "_exchange", recording)
    return calls


# -- one file ------------------------------------------------------------------------------------------------------
def test_atomic_file_replaces_the_file_and_leaves_no_temporary_name(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    (tmp_path / ".state.bin.tmp-deadbeef").write_bytes(b"left by a killed writer")
    with atomic_file(target) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".state.bin.tmp-")
        os.chmod(temp, 0o600)  # as safetensors does: the final file must still be readable by others
        temp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == plain_file_mode(tmp_path)
    assert hidden(tmp_path) == []


def test_atomic_file_disk_full_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as caught:
        with atomic_file(target, what="checkpoint") as temp:
            temp.write_bytes(b"ne")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temp))
    err = caught.value
    assert isinstance(err, ExportError) and err.errno == errno.ENOSPC and err.disk_full
    assert err.filename == str(target)
    assert f"Could not write the checkpoint to {target}: the disk is full" in str(err)
    assert "the previous checkpoint" in str(err) and "Free some space" in str(err)
    assert target.read_bytes() == b"old" and hidden(tmp_path) == []


def test_safetensors_error_text_gives_the_errno(tmp_path: Path) -> None:
    from safetensors import SafetensorError

    cause = SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    err = atomic.write_failure(cause, "merged export", tmp_path / "m", existed=False)
    assert isinstance(err, OSError) and err.errno == errno.EFBIG and err.disk_full
    assert "the disk is full" in str(err) and f"nothing was written at {tmp_path / 'm'}" in str(err)


# -- whole exports -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("swap", ["exchange", "fallback"])
def test_export_replaces_a_previous_export_of_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   exchange_calls: list[bool], swap: str) -> None:
    if swap == "fallback":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "out" / "adapter"
    export(target, "one")
    export(target, "two", names=("a.txt", "c.txt"))
    assert contents(target) == {MANIFEST: (target / MANIFEST).read_text(), "a.txt": "two", "c.txt": "two"}
    assert read_manifest(target) == {"kind": "adapter", "files": ["a.txt", "c.txt"], "writer": "lightning_lora"}
    assert hidden(target.parent) == []
    if swap == "exchange":
        assert exchange_calls == [True], "renameat2(RENAME_EXCHANGE) should work on Linux's local filesystems"


def test_export_modes_follow_the_umask_like_plain_files(tmp_path: Path) -> None:
    export(tmp_path / "x", "one")
    new_dir = tmp_path / "plain"
    new_dir.mkdir()
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == stat.S_IMODE(new_dir.stat().st_mode)
    for path in (tmp_path / "x").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == plain_file_mode(tmp_path), path


def test_the_umask_is_never_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.umask sets the umask of every thread; reading it that way races with threads creating files."""
    def refuse(mask: int) -> int:
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", refuse)
    export(tmp_path / "x", "one")
    export(tmp_path / "x", "two")
    with atomic_file(tmp_path / "f") as temp:
        temp.write_text("x")


def test_the_final_path_never_goes_missing_during_a_swap(tmp_path: Path, exchange_calls: list[bool]) -> None:
    """A reader polling the final path while it is replaced 100 times always finds an export there."""
    target = tmp_path / "adapter"
    export(target, "0")
    misses: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            if read_manifest(target) is None:  # one open by path: the directory at the final path, old or new
                misses.append("no complete export at the final path")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(100):
            export(target, str(i))
    finally:
        done.set()
        reader.join()
    assert all(exchange_calls) and misses == []


def test_a_failed_export_keeps_the_previous_one_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    export(target, "old", kind="merged")
    before = contents(target)
    with pytest.raises(ExportError, match=f"Could not write the merged export to {target}: the write failed"):
        with export_directory(target, "merged") as staging:
            (staging / "a.txt").write_text("half")
            raise PermissionError(errno.EACCES, "Permission denied")
    assert contents(target) == before and hidden(tmp_path) == []
    with pytest.raises(KeyError):  # not a write failure: passed through as it is
        with export_directory(target, "merged") as staging:
            raise KeyError("a bug in the writer")
    assert contents(target) == before and hidden(tmp_path) == []


def test_a_kill_between_the_fallbacks_renames_is_recovered_by_the_next_write(tmp_path: Path) -> None:
    """Without RENAME_EXCHANGE the old export is renamed aside first; if the process dies right then, the final
    path is missing and the next write puts the complete old export back before going on."""
    target = tmp_path / "adapter"
    export(target, "old")
    aside = tmp_path / ".adapter.old-1234abcd"
    os.rename(target, aside)  # the state a kill between the two renames leaves
    (tmp_path / ".adapter.tmp-5678abcd").mkdir()  # and the unfinished new one
    broken = tmp_path / ".adapter.old-00000000"  # an aside copy whose listed files are gone is not restored
    broken.mkdir()
    (broken / MANIFEST).write_text(json.dumps({"kind": "adapter", "files": ["a.txt"]}))
    with pytest.raises(ExportError):  # a later write that fails still leaves the old export at the final path
        with export_directory(target, "adapter"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert contents(target)["a.txt"] == "old" and hidden(tmp_path) == []


def test_recover_export_only_cleans_when_the_final_path_exists(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    export(target, "new")
    (tmp_path / ".adapter.old-1234abcd").mkdir()
    (tmp_path / ".adapter.tmp-1234abcd").write_text("partial")
    (tmp_path / ".adapterx.tmp-1234abcd").write_text("another target's: kept")
    recover_export(target)
    assert contents(target)["a.txt"] == "new" and hidden(tmp_path) == [".adapterx.tmp-1234abcd"]


def test_a_symlinked_target_replaces_what_it_points_to(tmp_path: Path) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    export(real, "old")
    link.symlink_to(real)
    export(link, "new")
    assert link.is_symlink() and contents(real)["a.txt"] == "new" and hidden(tmp_path) == []


# -- what may be replaced ------------------------------------------------------------------------------------------
def test_a_missing_or_empty_directory_may_be_written(tmp_path: Path) -> None:
    check_export_target(tmp_path / "new", "adapter")
    (tmp_path / "empty").mkdir()
    export(tmp_path / "empty", "x")
    assert contents(tmp_path / "empty")["a.txt"] == "x"


def test_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ExportTargetError, match=f"{target}: it is a file, not a directory.*remove that file") as err:
        export(target, "x")
    assert err.value.errno == errno.ENOTDIR
    assert target.read_text() == "mine" and hidden(tmp_path) == []


def test_a_path_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportTargetError, match=f"{tmp_path / 'notes.txt'} is a file, not a directory"):
        export(tmp_path / "notes.txt" / "sub" / "adapter", "x")
    assert (tmp_path / "notes.txt").read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]


def test_a_directory_with_other_files_is_refused_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "run"
    export(target, "ours")
    (target / "epoch=3.ckpt").write_text("a checkpoint")
    (target / ".git").mkdir()
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(ExportTargetError, match=r"not from a lightning_lora export \(\.git, epoch=3\.ckpt\).*"
                                                r"Choose a new or empty directory, or remove those files"):
        export(target, "x")
    assert sorted(p.name for p in target.iterdir()) == before
    assert (target / "epoch=3.ckpt").read_text() == "a checkpoint"
    assert (target / "a.txt").read_text() == "ours" and hidden(tmp_path) == []


def test_a_directory_without_our_manifest_is_refused(tmp_path: Path) -> None:
    """A PEFT adapter someone downloaded looks like ours but is not: it is never replaced."""
    target = tmp_path / "peft"
    target.mkdir()
    (target / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportTargetError, match=r"\(adapter_config\.json\)"):
        export(target, "x", names=("adapter_config.json",))
    (target / MANIFEST).write_text("not json")
    with pytest.raises(ExportTargetError, match=r"\(\.lightning_lora\.json, adapter_config\.json\)"):
        export(target, "x", names=("adapter_config.json",))


def test_an_export_of_another_kind_is_refused(tmp_path: Path) -> None:
    export(tmp_path / "merged", "m", kind="merged")
    with pytest.raises(ExportTargetError, match="it holds a previous merged export, which this would delete"):
        export(tmp_path / "merged", "a", kind="adapter")
    assert contents(tmp_path / "merged")["a.txt"] == "m"


@pytest.mark.parametrize("where", [".", "..", "absolute"])
def test_the_working_directory_is_refused_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          where: str) -> None:
    """Swapping the working directory away would leave the process in a deleted directory."""
    cwd = tmp_path / "project" / "run"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    target = {"absolute": str(cwd), ".": ".", "..": ".."}[where]
    with pytest.raises(ExportTargetError, match="current working directory.*Write into a subdirectory instead"):
        export(Path(target), "x")
    assert os.listdir(cwd) == [] and os.listdir(cwd.parent) == ["run"]
    export(Path("adapter"), "x")  # the fix the message gives works
    assert contents(cwd / "adapter")["a.txt"] == "x"
