"""``lightning-lora`` / ``python -m lightning_lora``: Lightning's CLI with the adapter as its own ``lora`` section.

The adapter's options read ``--lora.method=dora --lora.r=16`` (or a top-level ``lora:`` section in YAML), whatever
other callbacks ``trainer.callbacks`` lists: ``LoRACallback`` is a forced callback, Lightning's documented way
(``add_lightning_class_args``). ``--trainer.callbacks+=lightning_lora.LoRACallback``, which works in any LightningCLI,
still works here: a ``LoRACallback`` listed in ``trainer.callbacks`` replaces the ``lora`` section, and setting both
is an error that says which to keep.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any, Optional

from lightning_lora.callbacks import LoRACallback
from lightning_lora.callbacks._lightning import PACKAGES
from lightning_lora.config import ConfigError

LORA_KEY = "lora"
PACKAGE_ENV = "LIGHTNING_LORA_PACKAGE"
_PACKAGE_NAMES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch",
                  "lightning.pytorch": "lightning.pytorch"}


def lightning_package() -> ModuleType:
    """The Lightning package whose CLI and Trainer run: ``$LIGHTNING_LORA_PACKAGE`` (``pytorch_lightning`` or
    ``lightning``) when set, else ``pytorch_lightning`` if it is installed, else ``lightning.pytorch``.

    A Trainer accepts only LightningModules of its own package, so a user of ``import lightning as L`` who also has
    ``pytorch_lightning`` installed sets ``LIGHTNING_LORA_PACKAGE=lightning``.
    """
    wanted = os.environ.get(PACKAGE_ENV)
    if not wanted:
        return PACKAGES[0]
    name = _PACKAGE_NAMES.get(wanted)
    installed = {package.__name__: package for package in PACKAGES}
    if name is None or name not in installed:
        choices = ", ".join(n for n, full in _PACKAGE_NAMES.items() if full in installed and n != "lightning.pytorch")
        raise ImportError(f"{PACKAGE_ENV}={wanted!r} names no installed Lightning package; use one of: {choices}.")
    return installed[name]


LightningCLI: type = importlib.import_module(lightning_package().__name__ + ".cli").LightningCLI


def _is_lora_callback(entry: Any) -> bool:
    """Whether a parsed ``trainer.callbacks`` entry (a ``class_path`` namespace or an instance) is a LoRACallback."""
    if isinstance(entry, LoRACallback):
        return True
    class_path = getattr(entry, "class_path", None)
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)  # the parser has imported it already
    return isinstance(cls, type) and issubclass(cls, LoRACallback)


class LoRACLI(LightningCLI):
    """``LightningCLI`` in subclass mode (any LightningModule and LightningDataModule by ``class_path``) with a
    ``lora`` section that configures one ``LoRACallback``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(LoRACallback, LORA_KEY)

    def before_instantiate_classes(self) -> None:
        """Use the ``lora`` section unless ``trainer.callbacks`` lists a LoRACallback; refuse both set. Runs before
        the model is built (which may load a large checkpoint), so a bad option fails at once."""
        config = self.config.get(str(self.subcommand), self.config)
        listed = config.get("trainer.callbacks") or []
        listed = [c for c in (listed if isinstance(listed, list) else [listed]) if _is_lora_callback(c)]
        self.lora_section_used = not listed
        parser = self._parser(self.subcommand)
        if listed and config.get(LORA_KEY) != parser.get_defaults().get(LORA_KEY):
            parser.error(
                "Both the 'lora' section (--lora.*) and trainer.callbacks configure a LoRACallback, which would "
                "inject two adapters. Keep one: move the options into the 'lora' section (--lora.method=..., "
                "--lora.r=...) and drop lightning_lora.LoRACallback from trainer.callbacks, or remove the 'lora' "
                "options."
            )
        if self.lora_section_used:
            try:
                LoRACallback(**config[LORA_KEY].as_dict())  # validates every option; Lightning builds it again
            except ConfigError as error:
                unset = " --lora.<option>=null unsets an option that a config file sets."
                parser.error(f"Bad 'lora' section: {error}{unset if 'takes no option' in str(error) else ''}")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """As Lightning's, leaving out the ``lora`` section's callback when ``trainer.callbacks`` has its own."""
        keys = [k for k in self._parser(self.subcommand).callback_keys
                if k != LORA_KEY or getattr(self, "lora_section_used", True)]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, [self._get(self.config_init, k) for k in keys])


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
