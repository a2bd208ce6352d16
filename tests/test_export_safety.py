"""Exports and the data the user owns: refusals that delete nothing, a real full disk (EFBIG under RLIMIT_FSIZE), and
a bounded drill of SIGKILLs during exports. The drill's figures are printed on failure."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import make_llama
from peft_oracle import PEFT_WARNINGS, randomize_adapters
from safetensors.torch import load_file
from torch import nn

import lightning_lora.atomic as atomic
from lightning_lora.atomic import (
    MANIFEST,
    ExportTargetError,
    read_manifest,
    recover_export,
)
from lightning_lora.config import AdapterConfig
from lightning_lora.export import export_merged
from lightning_lora.io import load_adapter, save_adapter
from lightning_lora.surgery import adapters, inject

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]
TESTS = Path(__file__).parent


def adapted(make: Callable[[], nn.Module] = make_llama, seed: int = 3, **options: Any) -> nn.Module:
    model = make()
    inject(model, AdapterConfig.create("lora", **{"target_modules": "all-linear", "r": 4, **options}))
    randomize_adapters(model, seed=seed)
    return model


def fingerprint(model: nn.Module) -> list[tuple[str, Any]]:
    """Every parameter (value and requires_grad), buffer and module type."""
    return ([(f"param {n}", (p.detach().clone(), p.requires_grad)) for n, p in model.named_parameters()]
            + [(f"buffer {n}", (b.detach().clone(), None)) for n, b in model.named_buffers()]
            + [(f"module {n}", type(m)) for n, m in model.named_modules()])


def assert_same(before: list[tuple[str, Any]], after: list[tuple[str, Any]]) -> None:
    assert [n for n, _ in before] == [n for n, _ in after]
    for (name, a), (_, b) in zip(before, after):
        same = a == b if isinstance(a, type) else torch.equal(a[0], b[0]) and a[1] == b[1]
        assert same, name


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


WRITERS = {"save_adapter": save_adapter, "export_merged": export_merged}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_exports_add_their_files_and_replace_only_their_own(tmp_path: Path, writer: str) -> None:
    write = WRITERS[writer]
    target = tmp_path / "out"
    target.mkdir()  # a directory the user made for it
    write(adapted(seed=1), target)
    first = read_manifest(target)
    assert first is not None and first["kind"] == ("adapter" if writer == "save_adapter" else "merged")
    assert sorted(os.listdir(target)) == sorted([MANIFEST, *first["files"]])
    write(adapted(seed=2), target)
    assert read_manifest(target) == first and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_merged_export_with_a_tokenizer_lists_and_replaces_its_files(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    words.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    target = tmp_path / "merged"
    export_merged(adapted(seed=1), target, tokenizer=tokenizer)
    export_merged(adapted(seed=2), target, tokenizer=tokenizer)  # every file, the tokenizer's too, is ours
    files = read_manifest(target)["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sorted(os.listdir(target)) == sorted([MANIFEST, *files])
    assert AutoTokenizer.from_pretrained(str(target))("hello world")["input_ids"] == [1, 2]
    assert LlamaForCausalLM.from_pretrained(str(target)) is not None


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("case", ["regular-file", "run-folder", "other-kind", "working-directory"])
def test_exports_refuse_what_is_not_theirs_and_change_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               writer: str, case: str) -> None:
    """The issue's data loss: a run folder with checkpoints in it lost them; a file was replaced by a directory."""
    root = tmp_path / "root"
    root.mkdir()
    target = root / "out"
    if case == "regular-file":
        target.write_text("my notes")
        expected = f"{target}: it is a file, not a directory"
    elif case == "run-folder":
        target.mkdir()
        (target / "epoch=0-step=10.ckpt").write_bytes(b"checkpoint")
        (target / "hparams.yaml").write_text("lr: 0.1")
        expected = rf"{target}: it holds files that are not from a lightning_lora export \(epoch=0-step=10.ckpt, hparams"
    elif case == "other-kind":
        other = export_merged if writer == "save_adapter" else save_adapter
        other(adapted(seed=1), target)
        expected = f"{target}: it holds a previous (merged|adapter) export, which this would delete"
    else:
        target.mkdir()
        monkeypatch.chdir(target)
        target = Path(".")
        expected = r"to '\.' \(.*\): it is \(or holds\) the current working directory.*e\.g\. '\./(adapter|merged)'"
    model = adapted(seed=2)
    before, files = fingerprint(model), tree(root)
    with pytest.raises(ExportTargetError, match=expected):
        WRITERS[writer](model, target)
    assert_same(before, fingerprint(model))
    assert tree(root) == files and sorted(os.listdir(root)) == ["out"]


def test_save_adapter_dot_explains_and_the_fix_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = adapted()
    with pytest.raises(OSError, match="current working directory.*Write into a subdirectory instead, e.g. './adapter'"):
        save_adapter(model, ".")
    save_adapter(model, "./adapter")
    fresh = make_llama()
    assert load_adapter(fresh, "adapter") == list(adapters(model))


# -- a full disk, for real -----------------------------------------------------------------------------------------
DISK_FULL_SCRIPT = r"""
import json, os, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE then fails with EFBIG instead of killing us
sys.path.insert(0, sys.argv[2])
from conftest import make_llama, make_plain
from test_export_safety import adapted
from lightning_lora.export import export_merged
from lightning_lora.io import load_adapter, save_adapter

root, results = Path(sys.argv[1]), {}
cases = {"adapter": (save_adapter, make_llama), "merged-hf": (export_merged, make_llama),
         "merged-plain": (export_merged, make_plain)}
for name, (write, make) in cases.items():
    opts = {"target_modules": ["head", "block.0"]} if make is make_plain else {}
    target = root / name
    write(adapted(make, seed=1, **opts), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(len(b) for b in before.values()) // 2, hard))
    try:
        write(adapted(make, seed=2, **opts), target)
        outcome = {"type": None}
    except Exception as err:
        outcome = {"type": type(err).__name__, "oserror": isinstance(err, OSError),
                   "errno": getattr(err, "errno", None), "message": str(err)}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    outcome["unchanged"] = {p.name: p.read_bytes() for p in target.iterdir()} == before
    outcome["leftovers"] = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    write(adapted(make, seed=2, **opts), target)  # with space back, the next write works
    outcome["retry_changed"] = {p.name: p.read_bytes() for p in target.iterdir()} != before
    results[name] = outcome
print("RESULTS " + json.dumps(results))
"""


def test_a_full_disk_keeps_the_previous_export_and_raises_an_oserror(tmp_path: Path) -> None:
    """RLIMIT_FSIZE with SIGXFSZ ignored makes the kernel fail the write with EFBIG, as a full disk does (ENOSPC):
    safetensors then raises SafetensorError (not an OSError) from inside save_file or save_pretrained."""
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path), str(TESTS)], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    for name, outcome in results.items():
        kind = "adapter" if name == "adapter" else "merged"
        assert outcome["type"] == "ExportError" and outcome["oserror"] and outcome["errno"] == 27, (name, outcome)
        assert f"Could not write the {kind} export to {tmp_path / name}: the disk is full" in outcome["message"]
        assert f"the previous {kind} export at {tmp_path / name} is unchanged" in outcome["message"]
        assert outcome["unchanged"] and outcome["leftovers"] == [] and outcome["retry_changed"], (name, outcome)


# -- kill drill ----------------------------------------------------------------------------------------------------
def set_version(model: nn.Module, version: int) -> None:
    """Every adapter tensor holds the same value, so a file mixing two exports shows as two values."""
    with torch.no_grad():
        for adapter in adapters(model).values():
            for tensor in adapter.adapter_tensors().values():
                tensor.fill_(version / 1000)


def export_forever(root: Path, version: int, fallback: bool) -> None:
    """The child: export a new version into the same two directories until killed."""
    from transformers.utils import logging as hf_logging

    # tqdm's lock is a semaphore shared with the parent across fork: a child killed while holding it (during
    # save_pretrained's progress bar) would hang the parent's next export, so the child never takes it
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    if fallback:
        atomic._exchange = lambda a, b: False
        rename = os.rename

        def slow_rename(source: str, destination: str) -> None:  # widen the window between the two renames
            rename(source, destination)
            if ".old-" in os.fspath(destination):
                time.sleep(0.1)

        os.rename = slow_rename  # this child's os module only
    model = adapted()
    while True:
        set_version(model, version)
        save_adapter(model, root / "adapter")
        export_merged(model, root / "merged")
        version += 1


def check_export(target: Path, figures: dict[str, Any]) -> None:
    """Every file at the final path is complete, and the export loads."""
    from transformers import LlamaForCausalLM

    manifest = read_manifest(target)
    if manifest is None or sorted(os.listdir(target)) != sorted([MANIFEST, *manifest["files"]]):
        figures["corrupt"].append(f"{target}: {os.listdir(target)}")
        return
    for name in manifest["files"]:
        path = target / name
        figures["files checked"] += 1
        try:
            load_file(str(path)) if name.endswith(".safetensors") else json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - any failure to read is corruption
            figures["corrupt"].append(f"{path}: {err}")
    try:
        if target.name == "adapter":
            fresh = make_llama()
            load_adapter(fresh, target)
            tensors = [t for a in adapters(fresh).values() for t in a.adapter_tensors().values()]
            values = {v.item() for t in tensors for v in t.unique()}
            if len(values) != 1:
                figures["corrupt"].append(f"{target}: adapter tensors from several exports {sorted(values)}")
        else:
            LlamaForCausalLM.from_pretrained(str(target))
    except Exception as err:  # noqa: BLE001
        figures["corrupt"].append(f"{target} does not load: {err}")


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_kill_drill_exports_survive_sigkill_at_any_moment(tmp_path: Path) -> None:
    """12 SIGKILLs at random moments of a process exporting in a loop (8 with RENAME_EXCHANGE, 4 with the
    rename-aside fallback, its window between the two renames widened so that kills land there too). After each:
    every final path holds one complete export that loads (for the fallback, after the recovery the next write runs),
    and at the end one write leaves no temporary name behind."""
    rng = random.Random(2026)
    figures: dict[str, Any] = {"kills": 0, "files checked": 0, "corrupt": [], "leftovers seen": 0, "recovered": 0}
    model = adapted()
    set_version(model, 0)
    save_adapter(model, tmp_path / "adapter")
    export_merged(model, tmp_path / "merged")
    started = time.monotonic()
    for kill in range(12):
        fallback = kill >= 8
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child only ever ends by SIGKILL
            try:
                export_forever(tmp_path, 1 + 1000 * kill, fallback)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.5))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"the exporting child ended by itself (status {status}): {figures}"
        figures["kills"] += 1
        figures["leftovers seen"] += sum(p.name.startswith(".") for p in tmp_path.iterdir())
        for name in ("adapter", "merged"):
            target = tmp_path / name
            if fallback and not target.exists():  # killed between the fallback's two renames
                recover_export(target)
                figures["recovered"] += 1
            check_export(target, figures)
    save_adapter(model, tmp_path / "adapter")
    export_merged(model, tmp_path / "merged")
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    figures["seconds"] = round(time.monotonic() - started, 1)
    print(f"drill figures: {figures}")
    assert figures["corrupt"] == [] and left == [] and figures["kills"] == 12, f"drill figures: {figures}, left {left}"
