"""Checks every weight-update method's tests share (LoHa, LoKr, VeRA): PEFT as the oracle through tensor names, the
merge algebra on one random layer, and a real Trainer fit / resume. Not a test module."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from conftest import make_llama
from peft_oracle import logits, square_loss
from pytorch_lightning.callbacks import ModelCheckpoint
from tiny_modules import TinyLlamaModule, TokensDataModule, trainer
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import lightning_lora as ll
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.io import file_tensors
from lightning_lora.surgery import adapters, inject, merge, unmerge

ADAPTER = "default"


def peft_tensor(theirs: nn.Module, key: str) -> Tensor:
    """PEFT's tensor for one of our file keys ``<path>.<name>``: ``<path>.<name>[adapter]`` in PEFT's model."""
    path, _, name = key.rpartition(".")
    return getattr(theirs.base_model.model.get_submodule(path), name)[ADAPTER]


def ours_to_peft(ours: nn.Module, theirs: nn.Module) -> None:
    with torch.no_grad():
        for key, tensor in file_tensors(adapters(ours)).items():
            target = peft_tensor(theirs, key)
            assert target.shape == tensor.shape, (key, target.shape, tensor.shape)
            target.copy_(tensor)


def assert_same_as_peft(ours: nn.Module, theirs: nn.Module, base: nn.Module, x: Tensor,
                        peft_grad_wrong: tuple[str, ...] = ()) -> None:
    """Same outputs, different from the base's, and the same gradients for every adapter tensor except those named
    in ``peft_grad_wrong`` (whose PEFT gradient is known to be wrong; the caller says why)."""
    with torch.no_grad():
        expected, base_out = logits(theirs, x), logits(base, x)
    got = logits(ours, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base_out).abs().max() > 1e-3, "the adapters should change the output"
    square_loss(got).backward()
    square_loss(logits(theirs, x)).backward()
    for key, tensor in file_tensors(adapters(ours)).items():
        if key.rpartition(".")[2] in peft_grad_wrong:
            continue
        torch.testing.assert_close(tensor.grad, peft_tensor(theirs, key).grad, rtol=1e-4, atol=1e-5, msg=key)


def peft_pair(make: Callable[[], nn.Module], method: str, options: dict[str, Any], peft_config: Any,
              seed: int = 7) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, ours with random adapter tensors, PEFT's model holding the same tensors)."""
    import peft

    base = make()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create(method, init_weights=False, **options), seed=seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    ours_to_peft(ours, theirs)
    return base, ours, theirs


# -- merge algebra on one random layer ----------------------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def random_layer(kind: str, d_in: int, d_out: int, seed: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(d_in, d_out), torch.randn(3, d_in)
    if kind == "conv1d_hf":
        return Conv1D(d_out, d_in), torch.randn(2, 3, d_in)
    if kind == "conv1d":
        return nn.Conv1d(d_in, d_out, 3, padding=1), torch.randn(2, d_in, 7)
    return nn.Conv2d(d_in, d_out, (3, 2), stride=(1, 2)), torch.randn(2, d_in, 5, 6)


def check_merge_round_trip(method: str, kind: str, d_in: int, d_out: int, seed: int, **options: Any) -> None:
    """merge then unmerge gives the weight back, and merged and unmerged outputs agree (float32)."""
    layer, x = random_layer(kind, d_in, d_out, seed)
    model = Holder(layer)
    original = layer.weight.detach().clone()
    inject(model, AdapterConfig.create(method, target_modules=["layer"], init_weights=False, **options), seed=seed)
    with torch.no_grad():
        unmerged = model(x)
        merge(model)
        merged = model(x)
        unmerge(model)
    scale = max(1.0, unmerged.abs().max().item())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=2e-5 * scale)
    torch.testing.assert_close(model.layer.weight, original, rtol=0, atol=1e-6)
    assert (model.layer.delta_weight().abs().max() > 0).item()


# -- a real Trainer -----------------------------------------------------------------------------------------------
def check_fit_lowers_loss_and_exports_for_peft(tmp_path: Path, **callback_options: Any) -> None:
    """Every batch's loss drops from epoch 1 to 2, and the exported adapter gives PEFT the trained outputs."""
    import peft

    module = TinyLlamaModule()
    callback = ll.LoRACallback(export_dir=str(tmp_path / "export"), **callback_options)
    trainer(tmp_path, [callback], max_epochs=2).fit(module, TokensDataModule())
    first, second = module.losses[:8], module.losses[8:]  # the same 8 batches in each epoch (no shuffling)
    assert len(second) == 8 and all(b < a for a, b in zip(first, second)), module.losses
    assert (callback.adapter_dir / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(make_llama(), str(callback.adapter_dir)).eval()
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, token_batch()), logits(module.model, token_batch()),
                                   rtol=1e-5, atol=1e-5)


def check_resume_matches_uninterrupted_run(tmp_path: Path, **callback_options: Any) -> None:
    """Two epochs straight equal one epoch, a checkpoint, and one more epoch resumed from it."""
    pl.seed_everything(0)
    straight = TinyLlamaModule()
    trainer(tmp_path / "a", [ll.LoRACallback(**callback_options)], max_epochs=2).fit(straight, TokensDataModule())
    pl.seed_everything(0)
    first = TinyLlamaModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", [ll.LoRACallback(**callback_options), checkpoint], max_epochs=1).fit(first, TokensDataModule())
    resumed = TinyLlamaModule()
    torch.manual_seed(1234)  # resuming must not depend on the RNG state at the time of resume
    trainer(tmp_path / "b", [ll.LoRACallback(**callback_options), ModelCheckpoint(dirpath=tmp_path / "b")],
            max_epochs=2).fit(
        resumed, TokensDataModule(), ckpt_path=checkpoint.last_model_path)
    expected, actual = ll.adapter_state_dict(straight.model), ll.adapter_state_dict(resumed.model)
    assert expected.keys() == actual.keys() and expected
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(resumed.losses, straight.losses[8:], rtol=1e-5, atol=1e-6)


class ConvNet(nn.Module):
    """A 3x3 and a 1x1 Conv2d, a Conv1d and a linear head: every layer kind LoHa/LoKr adapt besides Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 6, 1)
        self.seq = nn.Conv1d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mix(torch.relu(self.stem(x))).flatten(2)
        return self.head(self.seq(h).mean(2))


def make_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


def image_batch() -> Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def token_batch() -> Tensor:
    return torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CLI_TINY = ["--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
            "--trainer.max_steps=1"]


def check_peft_file_loads_in_ours(tmp_path: Path, make: Callable[[], nn.Module], peft_config: Any, x: Tensor) -> None:
    """A PEFT adapter (random, so nothing is zero) saved by PEFT loads into ours with PEFT's outputs."""
    import peft

    torch.manual_seed(3)
    theirs = peft.get_peft_model(make(), peft_config).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = make()
    ll.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        expected = logits(theirs, x)
        torch.testing.assert_close(logits(ours, x), expected, rtol=1e-5, atol=1e-5)
        assert (expected - logits(make(), x)).abs().max() > 1e-3


def check_our_file_loads_in_peft(tmp_path: Path, ours: nn.Module, make: Callable[[], nn.Module], x: Tensor) -> None:
    """``save_adapter`` output loads in ``PeftModel.from_pretrained`` and in ours with the same outputs."""
    import peft

    ll.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
    again = make()
    ll.load_adapter(again, tmp_path / "ours")
    with torch.no_grad():
        expected = logits(ours, x)
        torch.testing.assert_close(logits(theirs, x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(again, x), expected, rtol=0, atol=0)


def check_dropout_draws_peft_masks(ours: nn.Module, theirs: nn.Module) -> None:
    """In training, one seed gives ours and PEFT the same rank/module dropout masks, another seed other masks; in
    eval mode nothing is dropped."""
    ours.train(), theirs.train()
    x = token_batch()
    with torch.no_grad():
        outputs = []
        for model, seed in ((ours, 3), (theirs, 3), (ours, 4), (ours, 3)):
            torch.manual_seed(seed)
            outputs.append(logits(model, x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-4, "the masks should depend on the seed"
    ours.eval()
    with torch.no_grad():
        assert (logits(ours, x) - outputs[3]).abs().max() > 1e-4, "no dropout in eval mode"


def check_refused_leaves_model_unchanged(model: nn.Module, method: str, **options: Any) -> None:
    """Injecting with a target the method cannot adapt is a ConfigError, with no module swapped."""
    import pytest

    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ConfigError):
        inject(model, AdapterConfig.create(method, **options))
    assert {n: type(m) for n, m in model.named_modules()} == before and not adapters(model)


def cli_config(tmp_path: Path, *args: str) -> AdapterConfig:
    """The adapter config ``lightning-lora fit`` on the tiny model builds from the ``--lora.*`` arguments ``args``."""
    from lightning_lora.cli import build_cli

    cli = build_cli(["fit", *CLI_TINY, f"--trainer.default_root_dir={tmp_path}", *args])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]
    return callback.config
