"""``lightning-lora`` / ``python -m lightning_lora``: Lightning's CLI, with the model, data and callbacks chosen in
YAML (``class_path``/``init_args``) or on the command line (``--trainer.callbacks+=lightning_lora.LoRACallback``)."""

from __future__ import annotations

import os
import sys
from typing import Optional

from pytorch_lightning.cli import LightningCLI


class LoRACLI(LightningCLI):
    """``LightningCLI`` in subclass mode: any LightningModule and LightningDataModule by ``class_path``."""


def build_cli(args: Optional[list[str]] = None) -> LoRACLI:
    """Parse ``args`` (default ``sys.argv[1:]``), build everything and run the subcommand; returns the CLI object.

    Class paths resolve from the working directory as with ``python -m lightning_lora`` (a console script does not
    put it on ``sys.path``), so ``lightning-lora fit --config examples/configs/...`` works from a checkout.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub at run time
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return LoRACLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """The ``lightning-lora`` console script. Returns None: its wrapper exits with ``sys.exit(main())``."""
    build_cli()
