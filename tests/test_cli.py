"""The ``lightning-lora`` CLI: the callback and all its options from YAML or the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning_lora as ll
from lightning_lora.cli import build_cli

TESTS = Path(__file__).parent


def run_cli(args: list[str]):
    return build_cli(["fit", "--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule",
                 "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
                 *args])


def the_callback(cli) -> ll.LoRACallback:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]
    return callback


def test_callback_options_from_the_command_line(tmp_path: Path) -> None:
    cli = run_cli([f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
                   "--trainer.callbacks+=lightning_lora.LoRACallback", "--trainer.callbacks.method=dora",
                   "--trainer.callbacks.r=2", "--trainer.callbacks.alpha=4", "--trainer.callbacks.target_modules=[q_proj,v_proj]",
                   f"--trainer.callbacks.export_dir={tmp_path / 'export'}"])
    callback = the_callback(cli)
    assert callback.config == ll.AdapterConfig.create("dora", r=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "export" / "merged" / "config.json").is_file()
    assert len(ll.adapters(cli.model.model)) == 4


def test_callback_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  max_steps: 2
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_lora.LoRACallback
      init_args:
        method: pfeiffer
        reduction_factor: 8
        nonlinearity: gelu
        export_dir: {tmp_path / 'export'}
""")
    callback = the_callback(run_cli([f"--config={config}"]))
    assert callback.config == ll.AdapterConfig.create("pfeiffer", reduction_factor=8, nonlinearity="gelu")
    assert callback.merged_dir is None and callback.adapter_dir.is_dir()


def test_bad_option_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_lora", "fit", "--model=tiny_modules.TinyLlamaModule",
         "--data=tiny_modules.TokensDataModule", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
         "--trainer.callbacks+=lightning_lora.LoRACallback", "--trainer.callbacks.reduction_factor=4"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(TESTS)}, timeout=120,
    )
    assert result.returncode != 0
    assert "  - Method 'lora' takes no option 'reduction_factor'. Its options are:" in result.stderr


def test_console_script_and_module_entry_points() -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    for command in ([sys.executable, "-m", "lightning_lora", "fit", "--help"], ["lightning-lora", "fit", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "--trainer.callbacks" in result.stdout


def test_console_script_exits_zero_after_a_run(tmp_path: Path) -> None:
    """The script's wrapper calls sys.exit(main()): main must not return the CLI object (that exits with 1)."""
    result = subprocess.run(
        ["lightning-lora", "fit", "--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule",
         "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=lightning_lora.LoRACallback",
         "--trainer.callbacks.r=2"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(TESTS)}, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_console_script_imports_class_paths_from_the_working_directory() -> None:
    """As ``python -m`` does: ``lightning-lora fit --config examples/configs/...`` from a checkout finds ``examples``."""
    root = TESTS.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(["lightning-lora", "fit", "--config", "examples/configs/smollm2_lora.yaml", "--print_config"],
                            capture_output=True, text=True, env=env, cwd=root, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: examples.chat.ChatModule" in result.stdout
