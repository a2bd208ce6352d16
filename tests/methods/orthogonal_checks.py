"""Checks the multiplicative methods' tests share (OFT, BOFT, HRA, Bone/MiSS): PEFT as the oracle for outputs,
gradients and files both ways, the merge algebra as a property, a real Trainer fit and resume, and refusals that
leave the model unchanged. Not a test module."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from conftest import VOCAB, make_llama
from peft_oracle import logits, square_loss
from pytorch_lightning.callbacks import ModelCheckpoint
from tiny_modules import TinyLlamaModule, TokensDataModule, trainer
from torch import Tensor, nn

import lightning_lora as ll
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.io import file_tensors, load_adapter, save_adapter
from lightning_lora.surgery import adapters, inject

PEFT_PREFIX = "base_model.model."


def tokens() -> Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def peft_key(key: str) -> str:
    """PEFT's state-dict key for one of our file keys: the adapter name goes before the tensor's own name."""
    if key.endswith((".oft_R.weight", ".oft_embedding_R.weight")):
        return PEFT_PREFIX + key.removesuffix(".weight") + ".default.weight"
    return PEFT_PREFIX + key + ".default"


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Random adapter tensors (scales near 1), so every update changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in file_tensors(adapters(model)).items():
            noise = torch.randn(tensor.shape, generator=gen) * scale
            tensor.copy_(noise + 1 if key.endswith("boft_s") else noise)


@contextlib.contextmanager
def peft_boft_butterflies() -> Iterator[None]:
    """PEFT's BOFT needs its CUDA extension for more than one butterfly factor (without it, it silently uses one);
    stand in for the extension's block-diagonal kernel with torch.block_diag so PEFT computes the real thing."""
    import peft.tuners.boft.layer as boft_layer

    class BlockDiag:
        @staticmethod
        def forward(x: Tensor) -> list[Tensor]:
            return [torch.stack([torch.block_diag(*blocks) for blocks in x])]

        @staticmethod
        def backward(grad: Tensor, x: Tensor) -> list[Tensor]:
            n, d, h, _ = x.shape
            return [torch.stack([torch.stack([grad[i, j * h:(j + 1) * h, j * h:(j + 1) * h] for j in range(d)])
                                 for i in range(n)])]

    previous, boft_layer._FBD_CUDA = boft_layer._FBD_CUDA, BlockDiag
    try:
        yield
    finally:
        boft_layer._FBD_CUDA = previous


def peft_pair(method: str, options: dict[str, Any], peft_config: Any,
              make: Callable[[], nn.Module] = make_llama) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, ours with random adapter tensors, PEFT's model holding the same tensors)."""
    import peft

    base = make()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create(method, **options), seed=0)
    randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    state = theirs.state_dict()
    with torch.no_grad():
        for key, tensor in file_tensors(adapters(ours)).items():
            assert state[peft_key(key)].shape == tensor.shape, key
            state[peft_key(key)].copy_(tensor)
    return base, ours, theirs


def assert_same_as_peft(base: nn.Module, ours: nn.Module, theirs: nn.Module) -> None:
    """Same outputs (different from the base's) and the same gradient for every adapter tensor."""
    x = tokens()
    with torch.no_grad():
        expected, base_out = logits(theirs, x), logits(base, x)
    got = logits(ours, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base_out).abs().max() > 1e-3, "the adapters should change the output"
    square_loss(got).backward()
    square_loss(logits(theirs, x)).backward()
    named = dict(theirs.named_parameters())
    for key, tensor in file_tensors(adapters(ours)).items():
        torch.testing.assert_close(tensor.grad, named[peft_key(key)].grad, rtol=1e-4, atol=1e-5, msg=key)


def assert_files_load_both_ways(tmp_path: Path, ours: nn.Module, theirs: nn.Module,
                                make: Callable[[], nn.Module] = make_llama) -> None:
    """Our export loads in PEFT, and PEFT's save loads in ours, each giving the same outputs."""
    import peft

    x = tokens()
    save_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    from_peft = make()
    load_adapter(from_peft, tmp_path / "theirs")
    with torch.no_grad():
        expected = logits(ours, x)
        torch.testing.assert_close(logits(in_peft, x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(from_peft, x), expected, rtol=1e-5, atol=1e-5)


def assert_merge_round_trip(method: str, d_in: int, d_out: int, seed: int, conv1d: bool = False,
                            **options: Any) -> None:
    """On one random layer: merged and unmerged outputs agree, unmerge gives the weight back, the update is real."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    model = nn.Sequential(Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out))
    x = torch.randn(4, d_in)
    original = model[0].weight.detach().clone()
    inject(model, AdapterConfig.create(method, target_modules=["0"], init_weights=False, **options), seed=seed)
    randomize(model, seed)
    with torch.no_grad():
        unmerged = model(x)
        ll.merge(model)
        merged = model(x)
        ll.unmerge(model)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=2e-5 * max(1.0, unmerged.abs().max().item()))
    torch.testing.assert_close(model[0].weight, original, rtol=0, atol=1e-6)
    assert model[0].delta_weight().abs().max() > 0  # not vacuous: the update changes the weight


def assert_starts_at_the_base(method: str, **options: Any) -> None:
    base = make_llama()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig.create(method, **options))
    with torch.no_grad():
        torch.testing.assert_close(logits(model, tokens()), logits(base, tokens()), rtol=0, atol=1e-6)


def assert_refused_before_any_change(model: nn.Module, match: str, method: str, **options: Any) -> None:
    """A ConfigError matching ``match``, and the model exactly as it was (no layer swapped, no tensor changed)."""
    import pytest

    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError, match=match):
        inject(model, AdapterConfig.create(method, **options))
    assert [type(m) for m in model.modules()] == kinds
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def assert_fit_and_resume(tmp_path: Path, **callback_options: Any) -> None:
    """A real Trainer.fit lowers the loss of most batches (and their mean) from epoch 1 to epoch 2; one epoch, a
    checkpoint and one more epoch resumed from it end with the adapter and losses of the two epochs straight."""
    pl.seed_everything(0)
    straight = TinyLlamaModule(lr=5e-2)
    trainer(tmp_path / "a", [ll.LoRACallback(**callback_options)], max_epochs=2).fit(straight, TokensDataModule())
    first, second = straight.losses[:8], straight.losses[8:]  # the same 8 batches in the same order
    assert sum(second) < sum(first) and sum(b < a for a, b in zip(first, second)) >= 6, (first, second)
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", [ll.LoRACallback(**callback_options), checkpoint], max_epochs=1).fit(
        TinyLlamaModule(lr=5e-2), TokensDataModule())
    resumed = TinyLlamaModule(lr=5e-2)
    torch.manual_seed(1234)  # resuming must not depend on the RNG state at the time of resume
    trainer(tmp_path / "b", [ll.LoRACallback(**callback_options)], max_epochs=2).fit(
        resumed, TokensDataModule(), ckpt_path=checkpoint.last_model_path)
    expected, actual = ll.adapter_state_dict(straight.model), ll.adapter_state_dict(resumed.model)
    assert expected.keys() == actual.keys() and expected
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(resumed.losses, straight.losses[8:], rtol=1e-5, atol=1e-6)


def cli_config(tmp_path: Path, *args: str) -> AdapterConfig:
    """The adapter config that ``lightning-lora --lora.method=... --lora.<option>=...`` parses (built, not run)."""
    from lightning_lora.cli import LoRACLI

    tiny = ["--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule", "--trainer.logger=false",
            "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"]
    cli = LoRACLI(subclass_mode_model=True, subclass_mode_data=True, args=[*tiny, *args], run=False,
                  auto_configure_optimizers=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]
    return callback.config


def assert_over_quantized_base(method: str, **options: Any) -> None:
    """Over an int8 base the update gives the outputs it gives over the dequantized weights, and trains."""
    from lightning_lora.methods.base import dense
    from lightning_lora.quantize import quantize_base

    model = make_llama()
    inject(model, AdapterConfig.create(method, target_modules=["q_proj", "up_proj"], init_weights=False, **options),
           seed=0)
    reference = copy.deepcopy(model)
    quantize_base(model, {"format": "int8"})
    with torch.no_grad():
        for path, layer in adapters(model).items():
            adapters(reference)[path].weight.copy_(dense(layer.weight).float())
        torch.testing.assert_close(logits(model, tokens()), logits(reference, tokens()), rtol=1e-5, atol=1e-5)
    square_loss(logits(model, tokens())).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in ll.surgery.adapter_parameters(model))
