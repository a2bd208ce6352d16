"""Every ``lightning-lora`` / ``python -m lightning_lora`` command the README prints is run here, so none can rot:
parsed with ``--print_config``, then one real training step with a tiny model and data swapped in.

Excluded on purpose: the README's two install chains under "The two commands" (they start with ``python3 -m venv``).
CI runs the test chain verbatim (``.ci/run``; it runs pytest, not our CLI). The main job's chain installs everything
and ends in ``lightning-lora fit --config examples/configs/smollm2_lora.yaml``: that command runs here on its own (it
is the first of "Command line"), and ``tests/test_example.py`` trains the real model and checks its exports.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

import lightning_lora as ll
from lightning_lora.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
INSTALL_CHAINS = "python3 -m venv .venv && "
PROGRAMS = (["lightning-lora"], ["python", "-m", "lightning_lora"])
TINY = ["--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule"]


def shell_lines(markdown: str) -> list[str]:
    """The lines of the README's shell code blocks, backslash continuations joined."""
    blocks, language, block = [], None, []
    for line in markdown.splitlines():
        if line.startswith("```"):
            if language is None:
                language, block = line[3:].strip(), []
            else:
                if language in ("", "bash", "sh", "shell", "console"):
                    blocks.append("\n".join(block))
                language = None
        elif language is not None:
            block.append(line)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def cli_commands(lines: list[str]) -> tuple[list[str], list[str]]:
    """(commands run here, install chains excluded): every line that runs our CLI falls in one of the two."""
    mentions = [line for line in lines if re.search(r"lightning-lora |-m lightning_lora ", line)]
    excluded = [line for line in mentions if line.startswith(INSTALL_CHAINS)]
    return [line for line in mentions if line not in excluded], excluded


COMMANDS, EXCLUDED = cli_commands(shell_lines((ROOT / "README.md").read_text(encoding="utf-8")))


def test_every_cli_command_is_covered() -> None:
    assert len(EXCLUDED) == 1, EXCLUDED  # the main job's install chain, and nothing else
    assert EXCLUDED[0].endswith("&& " + COMMANDS[0]), "the chain's own CLI command must also run here on its own"
    assert len(COMMANDS) >= 4
    for command in COMMANDS:
        words = shlex.split(command)
        assert any(words[: len(p)] == p for p in PROGRAMS), f"a README command this test cannot run: {command}"
        assert words[len(next(p for p in PROGRAMS if words[: len(p)] == p))] == "fit", command


def test_extraction_finds_continued_and_chained_lines() -> None:
    markdown = "```bash\nlightning-lora fit \\\n  --lora.r=2\n```\n```python\nx = 1\n```\n```bash\n" \
               "python3 -m venv .venv && . .venv/bin/activate && lightning-lora fit --config c.yaml\n```\n"
    assert cli_commands(shell_lines(markdown)) == (
        ["lightning-lora fit    --lora.r=2"],
        ["python3 -m venv .venv && . .venv/bin/activate && lightning-lora fit --config c.yaml"],
    )


def cli_args(command: str) -> list[str]:
    words = shlex.split(command)
    program = next(p for p in PROGRAMS if words[: len(p)] == p)
    return words[len(program):]


@pytest.mark.parametrize("command", COMMANDS, ids=[f"readme{i}" for i in range(len(COMMANDS))])
def test_readme_command(command: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository root
    args = cli_args(command)
    with pytest.raises(SystemExit) as raised:
        build_cli([*args, "--print_config"])
    assert raised.value.code == 0, capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    listed = [c for c in printed["trainer"]["callbacks"] or [] if c["class_path"].endswith("LoRACallback")]
    expected = listed[0]["init_args"] if listed else printed["lora"]

    overrides = [*TINY, "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=1"]
    export = f"{'--trainer.callbacks' if listed else '--lora'}.export_dir={tmp_path / 'export'}"
    cli = build_cli([*args, *overrides, export])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]
    assert callback.config.method == expected["method"]
    for option in ("r", "reduction_factor"):
        if expected.get(option) is not None:
            assert getattr(callback.config, option) == expected[option]
    assert cli.trainer.global_step == 1
    assert ll.adapters(cli.model.model)
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").is_file()
