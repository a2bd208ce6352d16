"""FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` per decoder layer) with 2 CPU processes (gloo).

The adapter after 8 steps equals one process's on the same global batch (rtol 1e-4, atol 1e-5, as for DDP: the
two differ only in the order float32 gradients are summed); checkpoints hold adapter tensors only, in one file that
one process resumes (and one process's, FSDP2 on two); the adapter export is written once, complete, by rank zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lora.sharded_export import read_merged

from test_ddp import assert_same_files  # the same file-by-file comparison as DDP's

SCRIPT = Path(__file__).with_name("ddp_train.py")
TOL = dict(rtol=1e-4, atol=1e-5)


def train(out: Path, devices: int, batch_size: int, *args: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", str(devices), "--batch-size", str(batch_size), "--out", str(out),
         *args], capture_output=True, text=True, timeout=600, env=env,
    )
    if result.returncode != 0:  # both ranks write to these pipes: keep every error line, not only the last rank's
        log = out.parent / f"{out.name}-failed.log"
        log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
        errors = [line for line in result.stderr.splitlines()
                  if any(word in line for word in ("Error", "error:", "terminate", "Abort", "Fatal", "signal"))]
        raise AssertionError(f"exit code {result.returncode}; full log {log}; error lines:\n" + "\n".join(errors[:40])
                             + "\n--- last output ---\n" + result.stdout[-2000:] + result.stderr[-2000:])
    return load_file(out / "adapter" / "adapter_model.safetensors") if (out / "adapter").is_dir() else {}


NF4 = '{"format": "nf4", "block_size": 16, "scaler_block_size": 4}'  # block sizes that divide the tiny weights


def step_checkpoint(run: Path, step: int) -> Path:
    return next((run / "ckpt").glob(f"*step={step}.ckpt"))


@pytest.mark.parametrize(("adapters", "quantize"), [("sharded", "null"), ("replicated", NF4)], ids=["sharded", "nf4"])
def test_fsdp2_matches_one_process_and_resumes_on_one(tmp_path: Path, adapters: str, quantize: str) -> None:
    """Every method, trained by one launch of each world size (``ddp_train.RUNS``): LoRA alone, every weight-update
    method at once as named adapters, and each inserted-module method in its own model. Sharded adapters over a
    float32 base (saved at world size 2 and resumed at 1, and back), with LoRA also trained with its blocks compiled
    (``compile=True``: regional torch.compile of FSDP2-sharded blocks, equal to one eager process); replicated
    adapters over an NF4 base (quantized before sharding, so FSDP2 shards the NF4 weights; the merged export
    dequantizes each gathered weight), and per-example adapters (``adapter_key``) there."""
    from ddp_train import ROUTED, RUNS, WEIGHT_UPDATES

    inserted = {name: run for name, run in RUNS.items() if name != "weight_updates"}
    runs = {"lora": {}, "weight_updates": RUNS["weight_updates"]}
    if adapters == "sharded":
        runs.update({**inserted, "compiled": {"options": {"compile": True}}})
    else:  # inserted methods adapt no linear layer: every frozen one is quantized
        runs.update({name: {**run, "quantize": {**json.loads(NF4), "modules": "all-linear"}}
                     for name, run in inserted.items()})
        # per-example adapters (replicated ones only): rank 0's examples all train "a", rank 1's all "b"
        runs["routed"] = {**ROUTED, "strategy": "fsdp2", "quantize": None}
    common = ("--export-merged", "--quantize", quantize)
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    train(one_dir, 1, 8, *common, "--runs", json.dumps({k: v for k, v in runs.items() if k != "compiled"}))
    train(two_dir, 2, 4, "--strategy", "fsdp2", "--adapters", adapters, *common, "--runs", json.dumps(runs))
    one = load_file(one_dir / "lora" / "adapter" / "adapter_model.safetensors")
    assert len(one) == 8 and any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if "lora_B" in k)
    for run in runs:
        # the adapter exports at steps 4 and 8 (every rank gathers, rank zero writes) and at the end, and the merged
        # exports, gathered one tensor at a time and merged in float32, equal one process's
        assert assert_same_files(two_dir / run, one_dir / ("lora" if run == "compiled" else run)) >= 3, run
    assert sorted(p.name for p in (two_dir / "weight_updates" / "adapter").iterdir() if p.is_dir()) == sorted(
        WEIGHT_UPDATES)
    for run in ("lora", "weight_updates"):
        torch.testing.assert_close(read_merged(two_dir / run / "merged"), read_merged(one_dir / run / "merged"), **TOL)
        saved = torch.load(step_checkpoint(two_dir / run, 4), weights_only=True)
        expected = torch.load(step_checkpoint(one_dir / run, 4), weights_only=True)
        assert saved["state_dict"].keys() == expected["state_dict"].keys()  # the adapter only, one process's names
        assert all(type(v) is torch.Tensor for v in saved["state_dict"].values())  # whole tensors, not DTensor shards
        torch.testing.assert_close(saved["state_dict"], expected["state_dict"], **TOL)
        # Adam's state of the adapter only, as one process's
        assert len(saved["optimizer_states"][0]["state"]) == len(expected["optimizer_states"][0]["state"])
        torch.testing.assert_close(saved["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"],
                                   **TOL)
    if adapters == "sharded":
        # saved at world size 2, resumed at world size 1 (plain strategy): the same adapters as the run never stopped
        # (AdaLoRA's importance statistics and rank masks resume too), and the other way: one process's checkpoint
        # resumed under FSDP2 on 2 (each rank loads its shards of the adapter and of Adam's state, after on_fit_start)
        for devices, source in ((1, two_dir), (2, one_dir)):
            resumed_dir = tmp_path / f"resumed-{devices}"
            resume = {run: {**runs[run], "resume": str(step_checkpoint(source / run, 4))} for run in ("lora",
                                                                                                    "weight_updates")}
            train(resumed_dir, devices, 8 // devices, "--strategy", "fsdp2", "--runs", json.dumps(resume))
            for run in resume:
                files = sorted(p.relative_to(one_dir / run) for p in (one_dir / run / "adapter").rglob("*.safetensors"))
                for name in files:
                    torch.testing.assert_close(load_file(resumed_dir / run / name), load_file(one_dir / run / name),
                                               **TOL, msg=str(name))


def test_fsdp2_refusals_name_the_fix(tmp_path: Path) -> None:
    """Tensor parallelism, a model that does not exist before configure_model and LoHa/LoKr's module dropout are
    refused in setup, with the model untouched."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    import lightning_lora as ll
    from tiny_modules import ConfigureModelLlama, TinyLlamaModule

    def setup(module: pl.LightningModule, **sizes: int) -> None:
        strategy = ModelParallelStrategy(**sizes)
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, default_root_dir=tmp_path)
        ll.LoRACallback(r=4, target_modules=["q_proj"], export_merged=False).setup(trainer, module, "fit")

    module = TinyLlamaModule()
    with pytest.raises(ll.ConfigError, match=r"tensor_parallel_size=2.*ModelParallelStrategy\(data_parallel_size=1, "
                                             r"tensor_parallel_size=1\)"):
        setup(module, data_parallel_size=1, tensor_parallel_size=2)
    assert not ll.adapters(module.model)
    with pytest.raises(ll.ConfigError, match="build it in __init__ and shard it in configure_model"):
        setup(ConfigureModelLlama(), data_parallel_size=1, tensor_parallel_size=1)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, default_root_dir=tmp_path)
    with pytest.raises(ll.ConfigError, match="loha set module_dropout.*module_dropout=0.*ddp_find_unused_parameters_true"):
        ll.LoRACallback("loha", r=4, module_dropout=0.2, export_merged=False).setup(trainer, module, "fit")
    assert not ll.adapters(module.model)


def test_per_example_adapters_need_replicated_adapters() -> None:
    """adapter_key under FSDP2 (checked once configure_model has sharded the model): refused for sharded adapters,
    which a batch's route would read outside the forward (the routed run of the nf4 case trains replicated ones)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import lightning_lora as ll
    from conftest import make_llama
    from lightning_lora.callbacks.distributed import check_routing
    from lightning_lora.distributed import shard_model

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # FSDP2 over one process
    try:
        for adapters in ("sharded", "replicated"):
            model = make_llama()
            ll.inject(model, {"method": "lora", "r": 4, "target_modules": ["q_proj"]}, seed=0)
            shard_model(model, init_device_mesh("cpu", (1,)), adapters=adapters)
            check_routing(model, None)
            if adapters == "sharded":
                with pytest.raises(ll.ConfigError, match=r"adapter_key='task'.*needs the adapters whole.*"
                                                         r"shard_model\(\.\.\., adapters='replicated'\)"):
                    check_routing(model, "task")
            else:
                check_routing(model, "task")
    finally:
        dist.destroy_process_group()


def test_merged_shards_in_save_pretrained_layout(tmp_path: Path) -> None:
    """write_merged splits at max_shard_size into model-0000i-of-0000n files + index that transformers loads, equal to
    export_merged's single file; the model is unchanged."""
    import lightning_lora as ll
    from conftest import make_llama
    from lightning_lora.sharded_export import INDEX, merged_tensors, write_merged
    from transformers import LlamaForCausalLM

    model = make_llama()
    ll.inject(model, {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": False}, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_merged(model, tmp_path / "sharded", merged_tensors(model), max_shard_size=20_000)
    ll.export_merged(model, tmp_path / "whole")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (tmp_path / "sharded" / INDEX).is_file() and (tmp_path / "sharded" / "config.json").is_file()
    assert read_merged(tmp_path / "sharded").keys() == read_merged(tmp_path / "whole").keys()
    torch.testing.assert_close(read_merged(tmp_path / "sharded"), read_merged(tmp_path / "whole"), rtol=0, atol=0)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "sharded")
    torch.testing.assert_close(dict(reloaded.state_dict()), read_merged(tmp_path / "whole"), rtol=0, atol=0)


def test_merged_shards_write_a_tied_weight_once(tmp_path: Path) -> None:
    import lightning_lora as ll
    from conftest import make_llama
    from lightning_lora.sharded_export import merged_tensors

    model = make_llama(tie=True)
    ll.inject(model, {"method": "lora", "r": 4, "target_modules": ["q_proj"], "init_weights": False}, seed=0)
    keys = [key for key, _ in merged_tensors(model)]
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    ll.export_merged(model, tmp_path / "whole")
    assert sorted(keys) == sorted(read_merged(tmp_path / "whole"))  # what save_pretrained writes
