"""Resuming a run of several named adapters (``LoRACallback(adapters=...)``): the checkpoint records every adapter's
options, and a resume with any of them changed is refused before anything is loaded, as for a single adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from tiny_modules import TinyLlamaModule, TokensDataModule, trainer

import lightning_lora as ll

TARGETS = ["q_proj", "v_proj"]


def named(**second) -> ll.LoRACallback:
    return ll.LoRACallback(adapters={"first": dict(r=4, target_modules=TARGETS),
                                     "second": {"r": 2, "alpha": 8, "target_modules": TARGETS, **second}})


def test_resume_compares_every_named_adapters_options(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    data = dict(count=8, batch_size=4)
    trainer(tmp_path, [named(), checkpoint], max_epochs=1).fit(TinyLlamaModule(), TokensDataModule(**data))
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    recorded = next(v for k, v in saved.items() if isinstance(v, dict) and "adapters" in v)["adapters"]
    assert list(recorded) == ["first", "second"] and recorded["second"]["alpha"] == 8

    # the second adapter's alpha and dropout change no tensor shape: only the recorded options can tell
    for change, message in ((dict(alpha=16), r"adapters\['second'\]\.alpha: 8 in the checkpoint vs 16 in the callback"),
                            (dict(dropout=0.1), r"adapters\['second'\]\.dropout: 0.0 in the checkpoint vs 0.1 in the")):
        module = TinyLlamaModule()
        with pytest.raises(ll.ConfigError, match=message):
            trainer(tmp_path, [named(**change)], max_epochs=2).fit(module, TokensDataModule(**data),
                                                                   ckpt_path=checkpoint.last_model_path)
        assert all(torch.equal(t, torch.zeros_like(t)) for k, t in ll.adapter_state_dict(module.model).items()
                   if "lora_B" in k), "a refused checkpoint must not be loaded"

    resumed = TinyLlamaModule()  # the same options resume
    trainer(tmp_path, [named()], max_epochs=2).fit(resumed, TokensDataModule(**data),
                                                   ckpt_path=checkpoint.last_model_path)
    assert resumed.trainer.global_step == 4
