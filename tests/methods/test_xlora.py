"""X-LoRA: PEFT's XLORA as the oracle (outputs, scalings and classifier gradients; dense and top-k, layerwise),
experts trained and saved by this project, only the classifier trains, generation, unload, options, training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from inserted_checks import batch, check_bad_option, greedy, outputs

from lightning_lora.config import AdapterConfig
from lightning_lora.io import load_adapter, save_adapter
from lightning_lora.surgery import adapters, inject, unload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> list[Path]:
    """Two LoRA exports of this project (random, so they matter), on different modules."""
    paths = []
    for seed, targets in enumerate((["q_proj", "v_proj"], ["v_proj", "down_proj"])):
        model = make_llama()
        inject(model, AdapterConfig.create("lora", r=2, target_modules=targets, init_weights=False), seed=seed)
        paths.append(save_adapter(model, tmp_path_factory.mktemp("expert") / "adapter"))
    return paths


def with_experts(paths: list[Path], **options) -> torch.nn.Module:
    model = make_llama()
    for name, path in zip(("code", "math"), paths):
        load_adapter(model, path, name=name)
    inject(model, AdapterConfig.create("xlora", **options), name="xlora", seed=0)
    return model


OPTIONS = [{}, {"layerwise_scalings": True, "top_k_lora": 1, "enable_softmax": False, "enable_softmax_topk": True,
                "scaling_pass_value": 0.3, "global_scaling_weight": 0.7},
           {"xlora_depth": 2, "xlora_size": 8, "xlora_dropout_p": 0.0, "softmax_temperature": 0.5}]


@pytest.mark.parametrize("options", OPTIONS, ids=["dense", "layerwise-top1", "deep"])
def test_same_as_peft(experts: list[Path], options: dict) -> None:
    import peft

    ours = with_experts(experts, **options)
    base = make_llama()
    base.config.use_cache = False  # PEFT's X-LoRA requires it
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters={"0": str(experts[0]),
                                                                                "1": str(experts[1])}, **options)
    theirs = peft.get_peft_model(base, config)
    classifier = theirs.base_model.internal_xlora_classifier
    classifier.layers.load_state_dict(ours.xlora_classifier.layers.state_dict())
    ids, mask = batch()
    got, expected = outputs(ours, ids, mask), outputs(theirs, ids, mask)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.xlora_classifier.latest_scalings, theirs.base_model.internal_xlora_scalings)
    assert (got[0] - outputs(make_llama(), ids, mask)[0]).abs().max() > 1e-3
    got[1].backward()
    expected[1].backward()
    for name, param in ours.xlora_classifier.layers.named_parameters():
        torch.testing.assert_close(param.grad, classifier.layers.get_parameter(name).grad, rtol=1e-4, atol=1e-6)


def test_only_the_classifier_trains_and_the_loss_falls(experts: list[Path]) -> None:
    model = with_experts(experts)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["xlora_classifier.layers.0.weight", "xlora_classifier.layers.0.bias"]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, mask = batch()
    losses = []
    for _ in range(8):
        loss = outputs(model, ids, mask)[1]
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 1e-3, losses
    both = with_experts(experts, use_trainable_adapters=True)
    assert sum(p.requires_grad for p in both.parameters()) == 2 + 2 * 2 * 2 + 2 * 2 * 2  # classifier + 4 LoRA layers


def test_generate_recomputes_each_step(experts: list[Path]) -> None:
    model = with_experts(experts)
    ids, _ = batch(seed=5, size=1)
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, greedy(model, ids, 4))


def test_unload_gives_back_the_base(experts: list[Path]) -> None:
    model = with_experts(experts)
    base = make_llama()
    assert model.generation_config.use_cache is False
    unload(model)
    assert not adapters(model) and model.generation_config.use_cache is True
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, ids, mask)[0], outputs(base, ids, mask)[0], rtol=0, atol=0)


@pytest.mark.parametrize("options,match", [
    ({"experts": ["code", "poetry"]}, "no adapter named 'poetry'"),
    ({"top_k_lora": 0}, "top_k_lora must be a positive integer"),
    ({"enable_softmax_topk": True}, "set top_k_lora too"),
    ({"xlora_dropout_p": 1.5}, "xlora_dropout_p must be a probability"),
    ({"target_modules": ["q_proj"]}, "xlora takes no target_modules"),
])
def test_bad_options_fail_before_the_model_changes(experts: list[Path], options: dict, match: str) -> None:
    def loaded() -> torch.nn.Module:
        model = make_llama()
        load_adapter(model, experts[0], name="code")
        return model

    model = loaded()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(Exception, match=match):
        inject(model, AdapterConfig.create("xlora", **options), name="xlora")
    assert list(adapters(model)) and "" not in adapters(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_model_without_experts_is_refused() -> None:
    check_bad_option(make_llama, "xlora", {}, "has none .* Load the experts first")


def test_save_and_load_with_the_experts(experts: list[Path], tmp_path: Path) -> None:
    """save_adapter writes the experts and the classifier in their sub-folders; loading the experts first and then the
    classifier gives the same model. The whole directory at once is refused clearly (the experts must come first)."""
    model = with_experts(experts, layerwise_scalings=True)
    torch.nn.init.normal_(model.xlora_classifier.layers[0].weight)
    save_adapter(model, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir() if p.is_dir()) == ["code", "math", "xlora"]
    fresh = make_llama()
    for name in ("code", "math", "xlora"):
        load_adapter(fresh, tmp_path / "saved" / name, name=name)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(fresh, ids, mask)[0], outputs(model, ids, mask)[0], rtol=0, atol=0)
    assert fresh.xlora_classifier.experts == ["code", "math"]
    with pytest.raises(Exception, match="Load the experts first"):
        load_adapter(make_llama(), tmp_path / "saved")


def test_gradient_checkpointing_is_refused(experts: list[Path]) -> None:
    model = with_experts(experts)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = batch()
    with pytest.raises(RuntimeError, match="does not support gradient checkpointing"):
        outputs(model, ids, mask)


def test_fit_with_the_callback_trains_the_classifier(experts: list[Path], tmp_path: Path) -> None:
    """LoRACallback(method="xlora") adds X-LoRA beside the experts the LightningModule loaded; a real Trainer.fit
    trains only the classifier, and the export holds the experts and the classifier."""
    import lightning_lora as ll
    from tiny_modules import TinyLlamaModule, TokensDataModule, trainer

    module = TinyLlamaModule(lr=0.1)
    for name, path in zip(("code", "math"), experts):
        load_adapter(module.model, path, name=name)
    experts_before = {k: v.clone() for k, v in module.model.state_dict().items() if ".adapters." in k}
    callback = ll.LoRACallback(method="xlora", export_dir=str(tmp_path / "export"))
    trainer(tmp_path, [callback], max_epochs=2).fit(module, TokensDataModule())
    first, second = module.losses[:8], module.losses[8:]
    assert sum(second) < sum(first), module.losses
    after = module.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in experts_before.items())  # the experts stayed frozen
    assert sorted(p.name for p in callback.adapter_dir.iterdir() if p.is_dir()) == ["code", "math", "xlora"]
    again = ll.LoRACallback(method="xlora", export_dir=str(tmp_path / "again"))  # a second fit keeps training it
    trainer(tmp_path / "again", [again], max_steps=1).fit(module, TokensDataModule())
    assert sorted(adapters(module.model)).count("") == 1


def test_delete_the_gating_keeps_the_experts(experts: list[Path]) -> None:
    from lightning_lora.surgery import adapter_names, delete_adapter

    model = with_experts(experts)
    with pytest.raises(Exception, match="one of the experts 'xlora'"):
        delete_adapter(model, "code")
    delete_adapter(model, "xlora")
    assert adapter_names(model) == ["code", "math"] and "" not in adapters(model)
    assert all(layer.batch_route is None for layer in adapters(model).values())
