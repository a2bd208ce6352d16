"""Mixed-adapter batches: each example names its adapter; one forward (and backward, and generate) applies each
example's own update, equal to running each example with its adapter alone."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_llama
from torch import nn

from lightning_lora import (
    ConfigError,
    disable_adapters,
    inject,
    merge,
    set_active_adapters,
    unmerge,
)
from lightning_lora.mixed import adapter_batch, clear_batch_adapters, set_batch_adapters

NAMES = ["a", None, "b", "c", "a", "__base__"]


def three_adapters(dora: bool = False) -> nn.Module:
    model = make_llama(0)
    inject(model, dict(method="lora", r=2, target_modules=["q_proj", "v_proj"], init_weights=False), seed=1, name="a")
    inject(model, dict(method="lora", r=4, alpha=3, target_modules=["v_proj", "down_proj"], init_weights=False),
           seed=2, name="b")
    inject(model, dict(method="dora" if dora else "lora", r=3, target_modules=["o_proj", "q_proj"],
                       init_weights=False), seed=3, name="c")
    return model


def one_by_one(model: nn.Module, tokens: torch.Tensor, names: list) -> torch.Tensor:
    """Each example alone with its adapter (or the base)."""
    outs = []
    for i, name in enumerate(names):
        if name in (None, "__base__"):
            with disable_adapters(model):
                outs.append(model(tokens[i:i + 1]).logits)
        else:
            set_active_adapters(model, name)
            outs.append(model(tokens[i:i + 1]).logits)
    return torch.cat(outs)


@pytest.mark.parametrize("dora", [False, True])  # LoRA's fast path, and the generic path (one DoRA adapter)
def test_mixed_forward_equals_each_example_with_its_adapter(dora: bool) -> None:
    model = three_adapters(dora)
    tokens = torch.randint(3, VOCAB, (len(NAMES), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with adapter_batch(model, NAMES):
            mixed = model(tokens).logits
        expected = one_by_one(model, tokens, NAMES)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert all(getattr(m, "batch_route", None) is None for m in model.modules())  # the block cleaned up


def test_each_adapter_gets_the_gradient_of_its_own_examples_only() -> None:
    model = three_adapters().train()
    tokens = torch.randint(3, VOCAB, (len(NAMES), 7), generator=torch.Generator().manual_seed(1))
    with adapter_batch(model, NAMES):
        logits = model(tokens).logits
    # summed over examples (not averaged), so that each example's gradient is the one it has alone
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="sum").backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()
    separate: dict[str, torch.Tensor] = {}
    for name in ("a", "b", "c"):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        set_active_adapters(model, name)
        out = model(tokens[rows]).logits
        nn.functional.cross_entropy(out[:, :-1].reshape(-1, VOCAB), tokens[rows][:, 1:].reshape(-1),
                                    reduction="sum").backward()
        separate.update({n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None and f".adapters.{name}." in n})
        model.zero_grad()
    assert mixed.keys() == separate.keys() and len(mixed) > 0
    for key in mixed:
        torch.testing.assert_close(mixed[key], separate[key], rtol=1e-4, atol=1e-5, msg=key)


def test_generate_uses_each_examples_adapter() -> None:
    model = three_adapters()
    prompts = torch.randint(3, VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    names = ["c", "a", None, "b"]
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with adapter_batch(model, names):
        mixed = model.generate(prompts, **options)
        beams = model.generate(prompts, num_beams=2, **options)  # examples repeated per beam, batch-major
    for i, name in enumerate(names):
        if name is None:
            with disable_adapters(model):
                alone, alone_beams = model.generate(prompts[i:i + 1], **options), model.generate(
                    prompts[i:i + 1], num_beams=2, **options)
        else:
            set_active_adapters(model, name)
            alone, alone_beams = model.generate(prompts[i:i + 1], **options), model.generate(
                prompts[i:i + 1], num_beams=2, **options)
        assert torch.equal(mixed[i], alone[0]) and torch.equal(beams[i], alone_beams[0])


def test_bad_mixed_batches_are_refused() -> None:
    model = three_adapters()
    tokens = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(ConfigError, match="no adapter named 'zz'"):
        set_batch_adapters(model, ["a", "zz"])
    with pytest.raises(ConfigError, match="batch of 2 examples.*given for 3"):
        with adapter_batch(model, ["a", "b", "c"]):
            model(tokens)
    with pytest.raises(ConfigError, match="one adapter name"):
        set_batch_adapters(model, "a")
    merge(model, names=["b"])
    with pytest.raises(ConfigError, match="merged"):
        set_batch_adapters(model, ["a", "b"])
    unmerge(model)
    assert all(getattr(m, "batch_route", None) is None for m in model.modules())
    set_batch_adapters(model, ["a", "b"])
    clear_batch_adapters(model)
    assert not model._forward_pre_hooks  # the batch check went with it


def test_multi_task_example_trains_three_adapters_from_one_dataloader(tmp_path) -> None:
    """examples/multi_task.py: LoRACallback(adapters=..., adapter_key="task"); each task is best served by its own
    adapter after training, and the export holds the three in PEFT's layout."""
    from examples import multi_task

    result = multi_task.main(max_steps=30, root=str(tmp_path))
    for task, row in result["scores"].items():
        assert row[task] < min(loss for adapter, loss in row.items() if adapter != task), (task, row)
    saved = sorted(p.name for p in result["adapter_dir"].iterdir() if p.is_dir())
    assert saved == ["copy", "mirror", "next"]


def test_callback_refuses_bad_named_adapters_and_batches(tmp_path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from examples import multi_task
    from lightning_lora import LoRACallback

    with pytest.raises(ConfigError, match=r"adapters\['b'\]: .*takes no option 'rank'"):
        LoRACallback(adapters={"a": {"r": 2}, "b": {"rank": 2}})
    with pytest.raises(ConfigError, match="give method options per adapter"):
        LoRACallback(r=4, adapters={"a": {"r": 2}})
    callback = LoRACallback(adapters={"a": {"r": 2}}, adapter_key="adapter", export_dir=str(tmp_path))
    trainer = pl.Trainer(callbacks=[callback], max_steps=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="adapter_key='adapter', but the batch has no such key"):
        trainer.fit(multi_task.TinyLM(), DataLoader(multi_task.Tasks(6, seed=0), batch_size=3))


def test_cli_takes_named_adapters_and_a_batch_key(tmp_path) -> None:
    import json

    from lightning_lora import LoRACallback
    from lightning_lora.cli import build_cli

    named = {"copy": {"r": 4}, "next": {"method": "lora", "r": 8}, "mirror": {"method": "dora", "r": 2}}
    cli = build_cli(["fit", "--model=examples.multi_task.TinyLM", "--data=examples.multi_task.TasksData",
                     "--data.count=12", "--data.batch_size=6", "--trainer.max_steps=2", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                     "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
                     f"--lora.adapters={json.dumps(named)}", "--lora.adapter_key=task",
                     f"--lora.export_dir={tmp_path / 'export'}"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRACallback)]
    assert {n: c.method for n, c in callback.named_configs.items()} == {"copy": "lora", "next": "lora", "mirror": "dora"}
    assert sorted(p.name for p in (tmp_path / "export" / "adapter").iterdir() if p.is_dir()) == ["copy", "mirror", "next"]


def test_mixed_training_batch_with_different_dropouts() -> None:
    """Each row gets its own adapter's dropout; rows without an adapter are the base's, whatever the draws."""
    model = make_llama(0)
    for name, p in (("a", 0.1), ("b", 0.5)):
        inject(model, dict(method="lora", r=2, dropout=p, target_modules=["q_proj"], init_weights=False), seed=1,
               name=name)
    model.train()
    tokens = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    with adapter_batch(model, ["a", "b", None]):
        out = model(tokens).logits
    out.sum().backward()
    with torch.no_grad(), disable_adapters(model):
        torch.testing.assert_close(out[2], model(tokens[2:]).logits[0], rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_serving_cache_follows_weight_changes() -> None:
    """Without autograd the concatenated factors are kept per layer; any in-place change of a factor (a hot-swap, an
    optimizer step) must show in the next mixed forward."""
    model = three_adapters()
    tokens = torch.randint(3, VOCAB, (len(NAMES), 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with adapter_batch(model, NAMES):
            model(tokens)
        for layer in model.modules():
            if hasattr(layer, "adapters") and "b" in layer.adapters:
                layer.adapters["b"].lora_B.weight.mul_(-2.0)
        with adapter_batch(model, NAMES):
            mixed = model(tokens).logits
        torch.testing.assert_close(mixed, one_by_one(model, tokens, NAMES), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("regional", [True, False])  # the callback's per-block compile, and the whole model's
def test_a_compiled_model_does_not_recompile_when_the_mix_changes(regional: bool) -> None:
    """Every LoRA adapter a layer holds is in its concatenated factors and the mix is only in tensors, so one graph
    serves every mix of the same batch size: other adapters, other orders, rows without an adapter, a DoRA adapter
    in or out of the batch (its generic path), in inference and in training."""
    import copy

    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = three_adapters(dora=True)
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    if regional:
        for block in model.model.layers:
            block.compile(backend=counter)
        compiled = model
    else:
        compiled = torch.compile(model, backend=counter)
    tokens = torch.randint(3, VOCAB, (len(NAMES), 7), generator=torch.Generator().manual_seed(5))
    mixes = [NAMES, ["b", "b", "a", "a", "b", "a"], [None, None, "a", None, "b", None], ["c"] * 6]
    frames = None
    with torch.no_grad():
        for names in mixes:
            with adapter_batch(model, names):
                got = compiled(tokens).logits
            frames = frames or counter.frame_count
            assert counter.frame_count == frames, f"recompiled for the mix {names}"
            torch.testing.assert_close(got, one_by_one(eager, tokens, names), rtol=1e-5, atol=1e-5)
    if not regional:
        return
    model.train()
    frames = None
    for names in (NAMES, ["c", "b", "a", None, "a", "c"]):  # training: the same adapters, other rows
        with adapter_batch(model, names):
            compiled(tokens).logits.sum().backward()
        frames = frames or counter.frame_count
        assert counter.frame_count == frames, f"recompiled for the training mix {names}"


def test_an_adapter_absent_from_a_training_batch_gets_no_gradient() -> None:
    """Its factors are in the layer's concatenation (zero mask columns), but detached: its .grad stays None, so an
    optimizer leaves it as separate per-adapter runs would (a zero gradient would still get AdamW's decay and
    momentum)."""
    model = three_adapters().train()
    tokens = torch.randint(3, VOCAB, (4, 5), generator=torch.Generator().manual_seed(6))
    with adapter_batch(model, ["a", None, "b", "a"]):
        model(tokens).logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None for n, g in grads.items() if ".adapters.c." in n)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".adapters.c." not in n)


def test_a_layers_kept_layout_follows_added_and_deleted_adapters() -> None:
    """What a layer keeps between batches (its adapters' rank layout) is rebuilt when an adapter is added or deleted."""
    from lightning_lora import delete_adapter

    model = three_adapters()
    tokens = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with adapter_batch(model, ["a", "b", "c"]):
            model(tokens)
        delete_adapter(model, "b")
        inject(model, dict(method="lora", r=5, target_modules=["v_proj", "o_proj"], init_weights=False), seed=4,
               name="d")
        names = ["d", "a", "c"]
        with adapter_batch(model, names):
            mixed = model(tokens).logits
        torch.testing.assert_close(mixed, one_by_one(model, tokens, names), rtol=1e-5, atol=1e-5)
