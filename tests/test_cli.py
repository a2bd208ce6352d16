"""The ``lightning-lora`` CLI: the ``lora`` section (``--lora.*``), ``trainer.callbacks`` for users of their own
LightningCLI, ``--help``, both Lightning packages, and the console script."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import docstring_parser
import pytest

import lightning_lora as ll
from lightning_lora.cli import build_cli, lightning_package
from lightning_lora.config import CONFIG_CLASSES

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
TINY = ["--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]


def run_cli(args: list[str]):
    return build_cli(["fit", *TINY, *args])


def lora_callbacks(cli) -> list[ll.LoRACallback]:
    return [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]


def test_lora_options_from_the_command_line(tmp_path: Path) -> None:
    cli = run_cli([f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--lora.method=dora",
                   "--lora.r=2", "--lora.alpha=4", "--lora.target_modules=[q_proj,v_proj]",
                   f"--lora.export_dir={tmp_path / 'export'}"])
    (callback,) = lora_callbacks(cli)
    assert callback.config == ll.AdapterConfig.create("dora", r=2, alpha=4.0, target_modules=["q_proj", "v_proj"])
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "export" / "merged" / "config.json").is_file()
    assert len(ll.adapters(cli.model.model)) == 4


def test_method_toggle_whatever_callbacks_the_config_lists(tmp_path: Path) -> None:
    """The README's toggle: a YAML ``lora`` section, ModelCheckpoint in trainer.callbacks, ``--lora.method`` wins."""
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  max_steps: 1
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: ModelCheckpoint
      init_args: {{dirpath: {tmp_path / 'ckpt'}}}
    - class_path: LearningRateMonitor
lora:
  method: lora
  r: 2
  target_modules: [q_proj]
  export_dir: {tmp_path / 'export'}
""")
    cli = run_cli([f"--config={config}", "--lora.method=dora", "--trainer.logger=true"])
    (callback,) = lora_callbacks(cli)
    assert callback.config == ll.AdapterConfig.create("dora", r=2, target_modules=["q_proj"])
    assert [type(c).__name__ for c in cli.trainer.callbacks].count("ModelCheckpoint") == 1
    assert list((tmp_path / "ckpt").glob("*.ckpt"))


def test_bottleneck_section_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer: {{max_steps: 1, default_root_dir: {tmp_path}}}
lora: {{method: pfeiffer, reduction_factor: 8, nonlinearity: gelu, export_dir: {tmp_path / 'export'}}}
""")
    (callback,) = lora_callbacks(run_cli([f"--config={config}"]))
    assert callback.config == ll.AdapterConfig.create("pfeiffer", reduction_factor=8, nonlinearity="gelu")
    assert callback.merged_dir is None and callback.adapter_dir.is_dir()


def test_trainer_callbacks_form_replaces_the_lora_section(tmp_path: Path) -> None:
    """What works in anyone's LightningCLI works here too, with one callback, not two."""
    cli = run_cli([f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
                   "--trainer.callbacks+=lightning_lora.LoRACallback", "--trainer.callbacks.r=2",
                   "--trainer.callbacks.target_modules=[q_proj]", f"--trainer.callbacks.export_dir={tmp_path / 'x'}"])
    (callback,) = lora_callbacks(cli)
    assert callback.config == ll.AdapterConfig.create("lora", r=2, target_modules=["q_proj"])
    assert len(ll.adapters(cli.model.model)) == 2


def test_both_forms_at_once_is_an_error_before_anything_is_built(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        run_cli([f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=lightning_lora.LoRACallback",
                 "--trainer.callbacks.r=2", "--lora.r=4"])
    assert raised.value.code != 0
    err = capsys.readouterr().err
    assert "Both the 'lora' section (--lora.*) and trainer.callbacks configure a LoRACallback" in err
    assert "drop lightning_lora.LoRACallback from trainer.callbacks" in err
    assert not list(tmp_path.iterdir())


def test_bad_option_fails_before_the_model_is_built(tmp_path: Path, monkeypatch, capsys) -> None:
    import tiny_modules

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the lora options were checked")

    monkeypatch.setattr(tiny_modules.TinyLlamaModule, "__init__", no_model)
    with pytest.raises(SystemExit) as raised:
        run_cli([f"--trainer.default_root_dir={tmp_path}", "--lora.reduction_factor=4"])
    assert raised.value.code != 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("Bad 'lora' section: Method 'lora' takes no option 'reduction_factor'. Its options are: target_modules,"
            in err)
    assert "--lora.<option>=null unsets an option that a config file sets." in err


def test_docstring_documents_every_option() -> None:
    """jsonargparse turns these entries into --help lines: one per __init__ argument, none stale."""
    documented = {p.arg_name: p.description for p in docstring_parser.parse(ll.LoRACallback.__doc__).params}
    assert list(documented) == list(inspect.signature(ll.LoRACallback).parameters)
    assert all(len(text.split()) >= 3 for text in documented.values()), documented


def test_help_lists_the_methods_and_a_line_per_option(capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        build_cli(["fit", "--help"])
    assert raised.value.code == 0
    help_text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=--)", help_text)
    for name in inspect.signature(ll.LoRACallback).parameters:
        (block,) = [b for b in blocks if b.startswith(f"--lora.{name} ")]
        text = re.sub(r"\(type: .*", "", block, flags=re.S)  # what is left of the option's name and metavar
        words = [w for w in text.split() if not (w.startswith(("--lora", "{")) or w.strip(",").isupper())]
        assert len(words) >= 3, f"--lora.{name} has no help line: {block!r}"
    (method,) = [b for b in blocks if b.startswith("--lora.method ")]
    method = " ".join(method.split())
    assert all(m in method for m in CONFIG_CLASSES), (sorted(CONFIG_CLASSES), method)


def test_console_script_exits_zero_after_a_run(tmp_path: Path) -> None:
    """The script's wrapper calls sys.exit(main()): main must not return the CLI object (that exits with 1)."""
    result = subprocess.run(
        ["lightning-lora", "fit", *TINY, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}",
         "--lora.r=2"],
        capture_output=True, text=True, env=ENV, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_console_script_imports_class_paths_from_the_working_directory() -> None:
    """As ``python -m`` does: ``lightning-lora fit --config examples/configs/...`` from a checkout finds ``examples``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(["lightning-lora", "fit", "--config", "examples/configs/smollm2_lora.yaml", "--print_config"],
                            capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: examples.chat.ChatModule" in result.stdout


# -- both Lightning packages ---------------------------------------------------------------------------------------
LIGHTNING_MODULE = '''
import lightning.pytorch as L
import torch
from conftest import VOCAB, make_llama


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = make_llama().train()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(list(torch.randint(3, VOCAB, (8, 10))), batch_size=4)
'''

ONLY_LIGHTNING = """
import sys
sys.modules["pytorch_lightning"] = None  # as if only `lightning` were installed
from lightning_lora.cli import main
main()
"""


@pytest.mark.parametrize("installed", ["both", "lightning only"])
def test_cli_runs_lightning_pytorch_modules(installed: str, tmp_path: Path) -> None:
    """``import lightning as L`` users: with both packages installed they set LIGHTNING_LORA_PACKAGE=lightning; with
    only ``lightning``, nothing."""
    pytest.importorskip("lightning.pytorch")
    (tmp_path / "lmodule.py").write_text(LIGHTNING_MODULE)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS)])}
    if installed == "both":
        command, env["LIGHTNING_LORA_PACKAGE"] = ["lightning-lora"], "lightning"
    else:
        command = [sys.executable, "-c", ONLY_LIGHTNING]
    args = ["fit", "--model=lmodule.Module", "--trainer.max_steps=2", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}", "--lora.r=2",
            "--lora.target_modules=[q_proj]", f"--lora.export_dir={tmp_path / 'export'}",
            "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "ckpt").glob("*.ckpt"))


def test_package_choice(monkeypatch) -> None:
    import pytorch_lightning

    monkeypatch.delenv("LIGHTNING_LORA_PACKAGE", raising=False)
    assert lightning_package() is pytorch_lightning  # preferred when both are installed
    monkeypatch.setenv("LIGHTNING_LORA_PACKAGE", "pytorch_lightning")
    assert lightning_package() is pytorch_lightning
    monkeypatch.setenv("LIGHTNING_LORA_PACKAGE", "lightnin")
    with pytest.raises(ImportError, match=r"LIGHTNING_LORA_PACKAGE='lightnin' names no installed Lightning package; "
                                          r"use one of: pytorch_lightning"):
        lightning_package()


def test_every_method_option_is_a_callback_argument():
    """The CLI (``--lora.<option>``, ``--trainer.callbacks.<option>``) can set only what LoRACallback's signature
    names: each option of each registered method must be one of its keyword arguments, typed for ``--help``."""
    import inspect

    from lightning_lora.config import method_option_names

    parameters = inspect.signature(ll.LoRACallback.__init__).parameters
    missing = [n for n in method_option_names() if n not in parameters]
    assert not missing, f"LoRACallback.__init__ lacks method options {missing}"
    untyped = [n for n in method_option_names() if parameters[n].annotation is inspect.Parameter.empty]
    assert not untyped
