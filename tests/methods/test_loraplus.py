"""LoRA+ (callbacks/loraplus.py): B's learning rate is ratio x A's in whatever optimizer configure_optimizers builds,
with its LR scheduler kept consistent; the same parameter classes as PEFT's create_loraplus_optimizer."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_llama
from peft_oracle import PEFT_WARNINGS
from pytorch_lightning.callbacks import ModelCheckpoint
from tiny_modules import TinyLlamaModule, TokensDataModule, trainer

import lightning_lora as ll
from lightning_lora.callbacks.loraplus import loraplus_rates, split_groups
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.io import file_tensors
from lightning_lora.surgery import adapters, inject

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS]
RATIO = 4.0


def lr_by_param(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_learning_rates_follow_peft(method: str) -> None:
    """Every adapter tensor gets the learning rate PEFT's create_loraplus_optimizer gives it: lr for A, lr * ratio for
    B and 1-D tensors (DoRA's magnitude), loraplus_lr_embedding for an embedding's adapter."""
    import peft
    from peft.optimizers import create_loraplus_optimizer

    targets = ["q_proj", "v_proj"] + (["embed_tokens"] if method == "lora" else [])
    base = make_llama()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create(method, r=2, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    assert split_groups(optimizer, [], loraplus_rates(adapters(ours), RATIO, 3e-5)) == (2 if method == "lora" else 1)
    mine = lr_by_param(optimizer)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=targets,
                                                                    use_dora=method == "dora"))
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=RATIO,
                                          loraplus_lr_embedding=3e-5)
    by_name = {id(p): n for n, p in theirs.named_parameters()}
    expected = {}
    for group in reference.param_groups:
        for p in group["params"]:
            key = by_name[id(p)].removeprefix("base_model.model.").replace(".default", "")
            expected[key.removesuffix(".weight") if "lora_magnitude_vector" in key else key] = group["lr"]
    got = {key: mine[id(t)] for key, t in file_tensors(adapters(ours)).items()}
    assert got == pytest.approx(expected) and set(got) == set(expected)
    assert {RATIO * 1e-3, 1e-3} <= set(got.values())


class ScheduledLlama(TinyLlamaModule):
    """AdamW over all parameters (as users write it) and a per-step LambdaLR; records every group's lr each step."""

    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        self.lrs: list[list[float]] = []

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.1 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        self.lrs.append([group["lr"] for group in optimizer.param_groups])


def loraplus(**options) -> ll.LoRACallback:
    return ll.LoRACallback(r=4, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=RATIO, **options)


def test_fit_trains_b_at_ratio_times_a_at_every_step(tmp_path: Path) -> None:
    module = ScheduledLlama()
    trainer(tmp_path, [loraplus()], max_epochs=2).fit(module, TokensDataModule())
    optimizer = module.trainer.optimizers[0]
    b_params = {id(layer.adapters["default"].lora_B.weight) for layer in adapters(module.model).values()}
    assert [all(id(p) in b_params for p in g["params"]) for g in optimizer.param_groups] == [False, True]
    assert optimizer.param_groups[1]["weight_decay"] == 0.01  # the user's other options travel with B
    assert len(module.lrs) == 16
    for step, (lr_a, lr_b) in enumerate(module.lrs):
        assert lr_a == pytest.approx(1e-2 / (1 + 0.1 * step)) and lr_b == pytest.approx(RATIO * lr_a)
    assert sum(module.losses[-4:]) < sum(module.losses[:4]) - 0.1


def test_resume_restores_the_split_optimizer(tmp_path: Path) -> None:
    pl.seed_everything(0)
    straight = ScheduledLlama()
    trainer(tmp_path / "a", [loraplus()], max_epochs=2).fit(straight, TokensDataModule(count=16))
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", [loraplus(), checkpoint], max_epochs=1).fit(ScheduledLlama(), TokensDataModule(count=16))
    resumed = ScheduledLlama()
    trainer(tmp_path / "b", [loraplus()], max_epochs=2).fit(resumed, TokensDataModule(count=16),
                                                            ckpt_path=checkpoint.last_model_path)
    torch.testing.assert_close(torch.tensor(resumed.lrs), torch.tensor(straight.lrs[4:]), rtol=1e-9, atol=0)
    expected, actual = ll.adapter_state_dict(straight.model), ll.adapter_state_dict(resumed.model)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_invalid_options() -> None:
    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be a positive"):
        ll.LoRACallback(loraplus_lr_ratio=0)
    with pytest.raises(ConfigError, match="set loraplus_lr_ratio"):
        ll.LoRACallback(loraplus_lr_embedding=1e-5)
    assert ll.LoRACallback(loraplus_lr_ratio=True).config.loraplus_lr_ratio == 16.0
    assert ll.LoRACallback().config.loraplus_lr_ratio is None


def test_unknown_per_group_scheduler_state_is_refused() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)

    class Odd:
        def __init__(self) -> None:
            self.optimizer, self.base_lrs = optimizer, [0.1, 0.1]  # one entry too many

    with pytest.raises(ConfigError, match="cannot extend Odd.base_lrs"):
        split_groups(optimizer, [Odd()], {id(optimizer.param_groups[0]["params"][0]): ("ratio", 2.0)})


def test_cli_parses_the_ratio(tmp_path: Path) -> None:
    from lightning_lora.cli import build_cli

    cli = build_cli(["fit", "--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", "--lora.r=2",
                     "--lora.loraplus_lr_ratio=16", "--lora.target_modules=[q_proj]"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]
    assert callback.config.loraplus_lr_ratio == 16.0
    assert len(cli.trainer.optimizers[0].param_groups) == 2


def test_tensor_learning_rates_are_scaled_too() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.Adam([a, b], lr=torch.tensor(0.01))
    split_groups(optimizer, [], {id(b): ("ratio", 4.0)})
    assert [float(g["lr"]) for g in optimizer.param_groups] == pytest.approx([0.01, 0.04])


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
    lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=3),
                                                            torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)], [3]),
], ids=["one-cycle", "sequential"])
def test_schedulers_keep_the_ratio(make_scheduler) -> None:
    """Schedulers that keep per-group values in the groups (OneCycleLR) or chain others (SequentialLR)."""
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([a, b], lr=0.01)
    scheduler = make_scheduler(optimizer)
    split_groups(optimizer, [scheduler], {id(b): ("ratio", RATIO)})
    for _ in range(8):
        optimizer.step()
        scheduler.step()
        lr_a, lr_b = (g["lr"] for g in optimizer.param_groups)
        assert lr_b == pytest.approx(RATIO * lr_a)
