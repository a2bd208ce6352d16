"""A new user's first screen: importing the package and asking the CLI for help print no warnings.

The noise this guards against: ``from transformers import PreTrainedModel`` imports torchao whenever it is installed
(``transformers.quantizers.quantizer_torchao``), and torchao logs "Failed to load ... _C_cutlass_90a.abi3.so" for its
CUDA kernels and torch logs an enum-registration deprecation per torchao enum. So the package imports transformers'
model code only when it meets a model, and torchao is an optional extra (``quant``), not a dependency.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONPATH")}

IMPORT = """
import sys
import lightning_lora
from lightning_lora import LoRACallback
heavy = [m for m in ("torchao", "transformers.modeling_utils") if m in sys.modules]
assert not heavy, f"importing lightning_lora imported {heavy}"
"""


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("command, shows", [
    ([sys.executable, "-c", IMPORT], ""),
    (["lightning-lora", "--help"], "{fit,validate,test,predict}"),
    ([sys.executable, "-m", "lightning_lora", "fit", "--help"], "--lora.method"),
], ids=["import", "lightning-lora --help", "python -m lightning_lora fit --help"])
def test_no_warnings(command: list[str], shows: str) -> None:
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "", f"the first screen prints:\n{result.stderr[-3000:]}"
    assert shows in result.stdout


def test_torchao_is_optional() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [d for d in project["dependencies"] if d.startswith("torchao")]
    assert [d for d in project["optional-dependencies"]["quant"] if d.startswith("torchao")]
