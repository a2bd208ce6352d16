"""AdaLoRA (methods/adalora.py) against PEFT as the oracle: outputs, the orthogonality loss, PEFT's RankAllocator on
the same gradients (same masks at every step), files both ways; and a Trainer.fit whose ranks shrink to target_r."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_gpt2, make_llama
from peft_oracle import PEFT_WARNINGS, logits
from pytorch_lightning.callbacks import ModelCheckpoint
from tiny_modules import TinyLlamaModule, TokensDataModule, trainer
from torch import nn

import lightning_lora as ll
from lightning_lora.config import AdapterConfig, ConfigError
from lightning_lora.io import load_adapter, save_adapter
from lightning_lora.methods import adalora
from lightning_lora.surgery import adapters, inject, merge, unmerge

pytestmark = [pytest.mark.filterwarnings(w) for w in PEFT_WARNINGS] + [
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning")]
TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "total_step": 10, "orth_reg_weight": 0.3}
TRIPLET = ("lora_A", "lora_E", "lora_B")


def tokens() -> torch.Tensor:
    return torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def build_pair(make=make_llama, targets=TARGETS) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, ours, PEFT's AdaLoRA) with the same random P, E, Q."""
    import peft

    base = make()
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("adalora", alpha=4.0, target_modules=targets, **SCHEDULE), seed=0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        task_type="CAUSAL_LM", lora_alpha=4.0, target_modules=targets, **SCHEDULE))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, layer in adapters(ours).items():
            for name in TRIPLET:
                mine = getattr(layer.adapters["default"], name)
                mine.copy_(torch.randn(mine.shape, generator=gen) * 0.3)
                getattr(theirs.base_model.model.get_submodule(path), name)["default"].copy_(mine)
    return base, ours, theirs


def test_allocation_and_regularizer_equal_peft_at_every_step() -> None:
    """Same loss (PEFT adds the orthogonality term to it), same gradients, and after each step PEFT's
    update_and_allocate and our allocate keep the same triplets: ranks shrink from 6 to 2 on average."""
    _, ours, theirs = build_pair()
    ours.train(), theirs.train()
    x = tokens()
    for step in range(SCHEDULE["total_step"]):
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
        loss = ours(x, labels=x).loss + adalora.orthogonality_loss(adapters(ours))
        reference = theirs(input_ids=x, labels=x).loss
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        loss.backward()
        reference.backward()
        with torch.no_grad():  # plain SGD on both
            for model in (ours, theirs):
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(0.05 * p.grad)
        adalora.allocate(adapters(ours), step, float("inf"))
        theirs.base_model.update_and_allocate(step)
        for path, layer in adapters(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(path)
            for name in TRIPLET:
                torch.testing.assert_close(getattr(layer.adapters["default"], name),
                                           getattr(peft_layer, name)["default"], rtol=1e-5, atol=1e-6)
    ranks = [int(layer.adapters["default"].rank_mask.sum()) for layer in adapters(ours).values()]
    assert sum(ranks) == SCHEDULE["target_r"] * len(ranks) and len(set(ranks)) > 1


def test_file_loads_in_peft_and_here_with_the_final_ranks(tmp_path: Path) -> None:
    base, ours, _ = build_pair(make_gpt2, ["c_attn", "c_fc"])
    ours.train()
    x = tokens()
    for step in range(4):  # two allocations: masks differ per layer
        ours.zero_grad()
        (ours(x, labels=x).loss + adalora.orthogonality_loss(adapters(ours))).backward()
        adalora.allocate(adapters(ours), step, float("inf"))
    save_adapter(ours.eval(), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    kept = {k: sum(v) for k, v in config["rank_pattern"].items()}
    assert kept == {f"{p}.lora_E": int(a.adapters["default"].rank_mask.sum()) for p, a in adapters(ours).items()}
    assert min(kept.values()) < SCHEDULE["init_r"]
    import peft

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        expected = logits(ours, x)
        torch.testing.assert_close(logits(theirs, x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(reloaded, x), expected, rtol=1e-5, atol=1e-5)
    save_adapter(reloaded, tmp_path / "again")  # a loaded adapter writes the same init_r-long pattern again
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == config["rank_pattern"]


def test_merge_then_unmerge_gives_the_weight_back() -> None:
    _, ours, _ = build_pair()
    before = {p: layer.weight.detach().clone() for p, layer in adapters(ours).items()}
    with torch.no_grad():
        unmerged = logits(ours, tokens())
        merge(ours)
        torch.testing.assert_close(logits(ours, tokens()), unmerged, rtol=1e-5, atol=1e-5)
        unmerge(ours)
    for path, layer in adapters(ours).items():
        torch.testing.assert_close(layer.weight, before[path], rtol=0, atol=1e-7)


def adalora_callback(**options) -> ll.LoRACallback:
    return ll.LoRACallback(method="adalora", init_r=4, target_r=2, tinit=2, tfinal=4, alpha=8.0,
                           target_modules=["q_proj", "v_proj"], **options)


def test_fit_shrinks_ranks_to_target_and_resumes(tmp_path: Path) -> None:
    """total_step comes from the Trainer (16 steps); the budget reaches target_r per layer, the loss falls, the
    export records the ranks, and a run resumed from a checkpoint (masks and importance statistics in it) ends
    where the uninterrupted one does (the interrupted run plans 8 steps, so its schedule is given explicitly)."""
    pl.seed_everything(0)
    straight = TinyLlamaModule()
    done = adalora_callback()
    trainer(tmp_path / "a", [done], max_epochs=2).fit(straight, TokensDataModule())
    layers = adapters(straight.model)
    assert sum(int(a.adapters["default"].rank_mask.sum()) for a in layers.values()) == 2 * len(layers)
    assert sum(straight.losses[-4:]) < sum(straight.losses[:4])
    pattern = json.loads((done.adapter_dir / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(sum(v) for v in pattern.values()) == 2 * len(layers)

    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", [adalora_callback(total_step=16), checkpoint], max_epochs=1).fit(TinyLlamaModule(),
                                                                                            TokensDataModule())
    resumed = TinyLlamaModule()
    trainer(tmp_path / "b", [adalora_callback(total_step=16)], max_epochs=2).fit(resumed, TokensDataModule(),
                                                                    ckpt_path=checkpoint.last_model_path)
    expected, actual = ll.adapter_state_dict(straight.model), ll.adapter_state_dict(resumed.model)
    assert any(k.endswith("lora_E_ipt") for k in expected) and expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert {int(a.adapters["default"].planned_steps) for a in layers.values()} == {16}


def test_resumed_run_keeps_the_planned_schedule(tmp_path: Path) -> None:
    """With total_step unset, the schedule is the first run's plan (8 steps here), kept in the checkpoint: a resume
    with more epochs continues that schedule instead of starting another."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, [adalora_callback(), checkpoint], max_epochs=1).fit(TinyLlamaModule(), TokensDataModule())
    resumed = TinyLlamaModule()
    trainer(tmp_path, [adalora_callback()], max_epochs=2).fit(resumed, TokensDataModule(),
                                                              ckpt_path=checkpoint.last_model_path)
    layers = adapters(resumed.model)
    assert {int(a.adapters["default"].planned_steps) for a in layers.values()} == {8}
    assert sum(int(a.adapters["default"].rank_mask.sum()) for a in layers.values()) == 2 * len(layers)


@pytest.mark.parametrize("options,message", [
    ({"init_r": 4, "target_r": 8}, "target_r=8 is above init_r=4"),
    ({"beta1": 1.0}, "beta1 must be an EMA factor"),
    ({"total_step": 10, "tinit": 6, "tfinal": 4}, "no budgeting phase"),
    ({"deltaT": 0}, "deltaT must be a positive integer"),
    ({"orth_reg_weight": -1}, "orth_reg_weight must be a number >= 0"),
])
def test_invalid_options(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ll.LoRACallback(method="adalora", **options)


def test_rank_too_large_leaves_the_model_unchanged() -> None:
    model = make_llama()
    with pytest.raises(ConfigError, match="init_r=48 is larger than"):
        inject(model, AdapterConfig.create("adalora", init_r=48, target_r=2, target_modules=["q_proj"]))
    assert not adapters(model)


def test_cli_parses_adalora(tmp_path: Path) -> None:
    from lightning_lora.cli import build_cli

    cli = build_cli(["fit", "--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3", "--lora.method=adalora",
                     "--lora.init_r=6", "--lora.target_r=4", "--lora.target_modules=[q_proj]"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]
    assert (callback.config.method, callback.config.target_r, callback.config.init_r) == ("adalora", 4, 6)


def test_forward_compiles_in_one_graph() -> None:
    model = make_llama(layers=1)
    inject(model, AdapterConfig.create("adalora", init_r=4, target_r=2, target_modules=["q_proj"]))
    explained = torch._dynamo.explain(model.model.layers[0].self_attn.q_proj)(torch.randn(2, 9, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_conv2d_matches_peft_both_ways(tmp_path: Path) -> None:
    """PEFT's SVDConv2d: A over the whole receptive field, the update one convolution; same outputs, files load both
    ways."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    ours = copy.deepcopy(base)
    inject(ours, AdapterConfig.create("adalora", init_r=3, target_r=1, total_step=10, target_modules=["0", "2"]))
    with torch.no_grad():
        for layer in adapters(ours).values():
            layer.adapters["default"].lora_E.normal_()
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    theirs.save_pretrained(tmp_path / "peft")
    back = copy.deepcopy(base)
    load_adapter(back, tmp_path / "peft")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = ours(x)
        assert (expected - base(x)).abs().max() > 1e-3
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-6)
        merge(ours)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_allocates_once_per_optimizer_step(tmp_path: Path, monkeypatch) -> None:
    """after_step runs once per optimizer step (here every second batch), with the step index from 0."""
    import dataclasses

    from lightning_lora.methods.registry import METHODS

    steps: list[int] = []

    def counting(found, step, planned):
        steps.append(step)
        return adalora.allocate(found, step, planned)

    monkeypatch.setitem(METHODS, "adalora", dataclasses.replace(METHODS["adalora"], after_step=counting))
    module = TinyLlamaModule()
    trainer(tmp_path, [adalora_callback()], max_epochs=2, accumulate_grad_batches=2).fit(module, TokensDataModule())
    assert steps == list(range(8))
    assert {int(a.adapters["default"].planned_steps) for a in adapters(module.model).values()} == {8}
