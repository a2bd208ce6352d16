"""The kill and full-disk drill: SIGKILL at random moments of a real ``Trainer.fit`` that checkpoints and exports at
every step, and a run whose files may not grow past a size limit. After each, every final path holds a complete file.

A server subprocess imports torch, transformers and Lightning once and forks one training child per run (imports
would otherwise take most of the drill's time); this test kills the children and checks the files.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

KILLS = 10
SEED = 6

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, SIGKILL and RLIMIT_FSIZE drill")


# -- the training child -------------------------------------------------------------------------------------------
def run_fit(root: Path, steps: int) -> None:
    """Train ``steps`` more steps from ``root/ckpt/last.ckpt`` (if any), checkpointing and exporting every step."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    import lightning_lora as ll
    from tiny_modules import TinyLlamaModule, TokensDataModule

    last = root / "ckpt" / "last.ckpt"
    done = torch.load(last, weights_only=True)["global_step"] if last.exists() else 0
    callback = ll.LoRACallback(r=4, target_modules=["q_proj", "v_proj"], dropout=0.1, export_dir=str(root / "export"),
                               export_on_checkpoint=True)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=2,
                                 monitor="train_loss")
    trainer = pl.Trainer(accelerator="cpu", max_steps=done + steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[callback, checkpoint],
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(TinyLlamaModule(), TokensDataModule(count=64), ckpt_path=str(last) if last.exists() else None)


def serve(root: Path) -> None:
    """Read commands from stdin: ``kill <delay>`` forks a child that trains and kills it after ``delay`` seconds,
    ``run`` lets it finish, ``limit <bytes> <steps>`` runs one under RLIMIT_FSIZE. Prints one JSON line each."""
    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]  # tests/, then this checkout
    import pytorch_lightning  # noqa: F401 - imported once here, inherited by every child
    from transformers import LlamaForCausalLM  # noqa: F401 - transformers imports lazily

    import lightning_lora.callbacks  # noqa: F401
    import tiny_modules  # noqa: F401

    torch.set_num_threads(1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the training child
            log = os.open(root / f"{command}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 0
            try:
                warnings.filterwarnings("always", message="lightning_lora")  # the export warnings, in the log
                if command == "limit":
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
                    resource.setrlimit(resource.RLIMIT_FSIZE, (int(args[0]), int(args[0])))
                    run_fit(root / "full", int(args[1]))
                else:
                    run_fit(root / "kill", 3)
            except BaseException as err:  # noqa: BLE001 - reported through the exit code and the log
                print(f"child raised {type(err).__name__}: {err}", flush=True)
                code = 1
            os._exit(code)
        if command == "kill":
            time.sleep(float(args[0]))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status, "seconds": time.monotonic() - start}), flush=True)


# -- the checks ---------------------------------------------------------------------------------------------------
def check_files(root: Path) -> dict[str, int]:
    """Every checkpoint and export at a final path is complete and loads; returns counts of what was checked."""
    from transformers import LlamaForCausalLM

    import lightning_lora as ll
    from conftest import make_llama

    counts = {"checkpoints": 0, "step_exports": 0, "final_pairs": 0, "temporaries": 0}
    for path in sorted((root / "ckpt").glob("*.ckpt")) if (root / "ckpt").is_dir() else []:
        saved = torch.load(path, weights_only=True)
        assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"]), path
        counts["checkpoints"] += 1
    export = root / "export"
    for step in sorted(export.glob("step-*")) if export.is_dir() else []:
        assert (step / "adapter" / "adapter_config.json").is_file(), f"{step} is incomplete: {os.listdir(step)}"
        json.loads((step / "adapter" / "adapter_config.json").read_text())
        assert load_file(step / "adapter" / "adapter_model.safetensors")
        assert load_file(step / "merged" / "model.safetensors")
        counts["step_exports"] += 1
    if export.is_dir() and (export / "adapter").exists():
        assert (export / "merged").is_dir(), "adapter/ without merged/"
        model = make_llama()
        ll.load_adapter(model, export / "adapter")
        ll.merge(model)
        merged = LlamaForCausalLM.from_pretrained(export / "merged")
        for name, tensor in merged.state_dict().items():  # the pair comes from one step
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} in {export}: {m}")
        counts["final_pairs"] += 1
    for directory in (root / "ckpt", export):
        if directory.is_dir():
            counts["temporaries"] += sum(1 for p in directory.iterdir() if p.name.startswith("."))
    return counts


def test_kill_and_full_disk_drill(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, __file__, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env, cwd=Path(__file__).parent.parent)
    assert server.stdin is not None and server.stdout is not None

    def ask(command: str) -> dict:
        server.stdin.write(command + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    try:
        assert json.loads(server.stdout.readline())["ready"]
        for _ in range(2):  # uninterrupted runs (3 steps each); the second, warm one times the kills
            first = ask("run")
            status = first["status"]
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (tmp_path / "run.log").read_text()
        rng = random.Random(SEED)
        totals = {"runs": 0, "kills": 0, "checkpoints": 0, "step_exports": 0, "final_pairs": 0, "temporaries": 0}
        while totals["kills"] < KILLS and totals["runs"] < 2 * KILLS:  # a child may finish before its kill comes
            totals["runs"] += 1
            result = ask(f"kill {rng.uniform(0.02, 1.0) * first['seconds']:.3f}")
            totals["kills"] += os.WIFSIGNALED(result["status"])
            for key, count in check_files(tmp_path / "kill").items():
                totals[key] += count
        print(f"drill: {totals}, one run {first['seconds']:.1f} s")
        last = ask("run")  # the next uninterrupted run finishes what the kills left and cleans their temporaries
        assert os.WIFEXITED(last["status"]) and os.WEXITSTATUS(last["status"]) == 0, (tmp_path / "run.log").read_text()
        assert check_files(tmp_path / "kill")["temporaries"] == 0
        assert totals["kills"] >= KILLS // 2
        assert totals["checkpoints"] > 0 and totals["step_exports"] > 0

        # A file size limit between the checkpoint's size and the merged model's: every export fails, training goes on.
        full = tmp_path / "full"
        result = ask("limit 60000 3")
        log = (tmp_path / "limit.log").read_text()
        assert os.WIFEXITED(result["status"]) and os.WEXITSTATUS(result["status"]) == 1, log[-3000:]
        assert "child raised ExportError: The final export to" in log and "disk is full" in log, log[-3000:]
        assert log.count("the export of step") == 3, log[-3000:]  # warned at each step, trained on
        assert torch.load(full / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
        check_files(full)
        assert not any(p.name.startswith("step-") for p in (full / "export").glob("*"))

        # A limit below the checkpoint's size: the checkpoint write fails and stops training; the previous one stays.
        result = ask("limit 20000 3")
        log = (tmp_path / "limit.log").read_text()
        assert os.WIFEXITED(result["status"]) and os.WEXITSTATUS(result["status"]) == 1, log[-3000:]
        assert "child raised ExportError: Could not write the checkpoint to" in log, log[-3000:]
        assert torch.load(full / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
        assert check_files(full)["temporaries"] == 0
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def test_a_final_export_cut_between_its_two_swaps_is_finished_by_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_lora as ll
    from conftest import make_llama
    from lightning_lora.callbacks import exports

    model = make_llama()
    ll.inject(model, ll.AdapterConfig.create("lora", r=2, target_modules=["q_proj"]), seed=0)
    exports.export_final(model, tmp_path, merged=True)
    first = {n: load_file(tmp_path / n / f) for n, f in (("adapter", "adapter_model.safetensors"),
                                                         ("merged", "model.safetensors"))}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)

    real, calls = exports._exchange, []

    def killed_after_one_swap(a: Path, b: Path) -> bool:
        if calls:
            raise KeyboardInterrupt("the process dies here")
        calls.append(b.name)
        return real(a, b)

    monkeypatch.setattr(exports, "_exchange", killed_after_one_swap)
    with pytest.raises(KeyboardInterrupt):
        exports.export_final(model, tmp_path, merged=True)
    monkeypatch.setattr(exports, "_exchange", real)
    assert calls == ["adapter"] and (tmp_path / exports.JOURNAL).is_dir()
    torch.testing.assert_close(load_file(tmp_path / "merged" / "model.safetensors"), first["merged"])  # still old

    exports.finish_final(tmp_path)  # what the callback's setup runs before training
    assert sorted(os.listdir(tmp_path)) == ["adapter", "merged"]
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all((t == 0.5).all() for k, t in adapter.items() if "lora_B" in k)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], first["merged"][key])  # the pair is the new one, both halves
    fresh = make_llama()
    ll.load_adapter(fresh, tmp_path / "adapter")
    ll.merge(fresh)
    torch.testing.assert_close(merged[key], fresh.state_dict()[key])

if __name__ == "__main__":
    serve(Path(sys.argv[1]))
