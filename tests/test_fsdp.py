"""FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` per decoder layer) with 2 CPU processes (gloo).

The adapter after 8 steps equals one process's on the same global batch (rtol 1e-4, atol 1e-5, as for DDP: the
two differ only in the order float32 gradients are summed); checkpoints hold adapter tensors only, in one file that
one process resumes (and one process's, FSDP2 on two); the adapter export is written once, complete, by rank zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lora.sharded_export import read_merged

SCRIPT = Path(__file__).with_name("ddp_train.py")
TOL = dict(rtol=1e-4, atol=1e-5)


def train(out: Path, devices: int, batch_size: int, *args: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", str(devices), "--batch-size", str(batch_size), "--out", str(out),
         *args], capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return load_file(out / "adapter" / "adapter_model.safetensors")


NF4 = '{"format": "nf4", "block_size": 16, "scaler_block_size": 4}'  # block sizes that divide the tiny weights


@pytest.mark.parametrize(("method", "adapters", "quantize"), [("lora", "sharded", "null"), ("lora", "replicated", NF4),
                                                             ("dora", "sharded", "null")], ids=["sharded", "nf4", "dora"])
def test_fsdp2_matches_one_process_and_resumes_on_one(tmp_path: Path, method: str, adapters: str, quantize: str) -> None:
    """LoRA with sharded adapters over a float32 base (and resumed at world size 1); LoRA with replicated adapters
    over an NF4 base (quantized before sharding, so FSDP2 shards the NF4 weights; the merged export dequantizes each
    gathered weight); DoRA (its magnitude sharded too)."""
    one_dir = tmp_path / "one"
    one = train(one_dir, 1, 8, "--export-merged", "--quantize", quantize, "--method", method)
    two = train(tmp_path / "two", 2, 4, "--strategy", "fsdp2", "--adapters", adapters, "--export-merged",
                "--quantize", quantize, "--method", method)
    assert two.keys() == one.keys() and len(one) == (12 if method == "dora" else 8)
    for key in one:
        torch.testing.assert_close(two[key], one[key], **TOL, msg=key)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if "lora_B" in k)
    step4 = load_file(tmp_path / "two" / "step-4" / "adapter" / "adapter_model.safetensors")  # exported at a checkpoint
    torch.testing.assert_close(step4, load_file(one_dir / "step-4" / "adapter" / "adapter_model.safetensors"), **TOL)

    ckpt = next((tmp_path / "two" / "ckpt").glob("*step=4.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    expected = torch.load(next((one_dir / "ckpt").glob("*step=4.ckpt")), weights_only=True)
    assert saved["state_dict"].keys() == expected["state_dict"].keys()  # the adapter only, one process's key names
    assert all(type(v) is torch.Tensor for v in saved["state_dict"].values())  # whole tensors, not DTensor shards
    torch.testing.assert_close(saved["state_dict"], expected["state_dict"], **TOL)
    assert len(saved["optimizer_states"][0]["state"]) == len(one)  # Adam's state of the adapter only, as one process's
    torch.testing.assert_close(saved["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"], **TOL)
    # the merged export, gathered one tensor at a time and merged in float32, equals one process's save_pretrained
    merged, expected_merged = read_merged(tmp_path / "two" / "merged"), read_merged(one_dir / "merged")
    assert merged.keys() == expected_merged.keys()
    torch.testing.assert_close(merged, expected_merged, **TOL)
    for step in (4, 8):
        torch.testing.assert_close(read_merged(tmp_path / "two" / f"step-{step}" / "merged"),
                                   read_merged(one_dir / f"step-{step}" / "merged"), **TOL)
    if adapters == "sharded" and method == "lora":
        # saved at world size 2, resumed at world size 1 (plain strategy): the same adapter as the run never stopped
        resumed = train(tmp_path / "resumed", 1, 8, "--resume", str(ckpt))
        for key in one:
            torch.testing.assert_close(resumed[key], one[key], **TOL, msg=key)
        # and the other way: one process's checkpoint resumed under FSDP2 on 2 (each rank loads its shards of the
        # adapter and of Adam's state, after Lightning's on_fit_start)
        one_ckpt = next((one_dir / "ckpt").glob("*step=4.ckpt"))
        resumed = train(tmp_path / "resumed2", 2, 4, "--strategy", "fsdp2", "--resume", str(one_ckpt))
        for key in one:
            torch.testing.assert_close(resumed[key], one[key], **TOL, msg=key)


def test_fsdp2_refusals_name_the_fix(tmp_path: Path) -> None:
    """Tensor parallelism, and a model that does not exist before configure_model, are refused in setup, with the
    model untouched."""
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
    with pytest.raises(ll.ConfigError, match="supports lora, dora with one adapter.*not loha yet.*strategy='ddp'"):
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, default_root_dir=tmp_path)
        ll.LoRACallback("loha", r=4, target_modules=["q_proj"], export_merged=False).setup(trainer, module, "fit")
    assert not ll.adapters(module.model)


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
