"""LoRACallback in a real Trainer: freezing, optimizer contents, adapter-only checkpoints, resume, export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_lora as ll
from conftest import make_llama
from tiny_modules import ConfigureModelLlama, PlainModule, TinyLlamaModule, TokensDataModule, trainer



def lora(**kwargs) -> ll.LoRACallback:
    kwargs.setdefault("r", 4)
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    return ll.LoRACallback(**kwargs)


def test_fit_trains_only_the_adapter(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    module = TinyLlamaModule()
    base_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = lora()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [callback]).fit(module, TokensDataModule())

    assert "lightning_lora: lora on 4 modules of LlamaForCausalLM (model); trainable parameters 896 of" in caplog.text
    adapter_state = ll.adapter_state_dict(module.model)
    for key, before in base_before.items():
        assert torch.equal(module.model.state_dict()[key], before), f"base tensor {key} changed"
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in adapter_state.items() if "lora_B" in k)
    optimizer = module.trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in ll.surgery.adapter_parameters(module.model)}
    assert module.losses[-1] < module.losses[0]


def test_checkpoint_holds_only_the_adapter(tmp_path: Path) -> None:
    module = TinyLlamaModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [lora(), checkpoint]).fit(module, TokensDataModule())
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    assert set(saved["state_dict"]) == {f"model.{k}" for k in ll.adapter_state_dict(module.model)}
    assert saved["lightning_lora"]["method"] == "lora"
    assert saved["lightning_lora"]["base_fingerprint"] == ll.base_fingerprint(module.model)
    optimizer_state = saved["optimizer_states"][0]["state"]
    assert len(optimizer_state) == 8  # AdamW moments for the 8 adapter tensors only


@pytest.mark.parametrize("module_class", [TinyLlamaModule, ConfigureModelLlama])
def test_resume_matches_uninterrupted_run(tmp_path: Path, module_class: type) -> None:
    pl.seed_everything(0)
    straight = module_class()
    trainer(tmp_path / "a", [lora(dropout=0.1)], max_epochs=4).fit(straight, TokensDataModule())

    pl.seed_everything(0)
    first = module_class()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(tmp_path / "b", [lora(dropout=0.1), checkpoint], max_epochs=2).fit(first, TokensDataModule())
    resumed = module_class()
    torch.manual_seed(1234)  # resuming must not depend on the RNG state at the time of resume
    trainer(tmp_path / "b", [lora(dropout=0.1), ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)],
            max_epochs=4).fit(resumed, TokensDataModule(), ckpt_path="last")

    assert resumed.trainer.global_step == straight.trainer.global_step == 32
    expected, actual = ll.adapter_state_dict(straight.model), ll.adapter_state_dict(resumed.model)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(resumed.losses, straight.losses[16:], rtol=1e-5, atol=1e-6)


def test_resume_with_other_options_or_base_is_an_error(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, [lora(), checkpoint], max_epochs=1).fit(TinyLlamaModule(), TokensDataModule())
    with pytest.raises(ll.ConfigError, match="trained with other options .*r: 4 in the checkpoint vs 2 in the callbac"):
        trainer(tmp_path, [lora(r=2)]).fit(TinyLlamaModule(), TokensDataModule(), ckpt_path=checkpoint.last_model_path)
    other_base = TinyLlamaModule(seed=7)
    with pytest.raises(ll.ConfigError, match="different base model"):
        trainer(tmp_path, [lora()]).fit(other_base, TokensDataModule(), ckpt_path=checkpoint.last_model_path)
    assert all(torch.equal(t, torch.zeros_like(t)) for k, t in ll.adapter_state_dict(other_base.model).items()
               if "lora_B" in k), "a refused checkpoint must not be loaded"


def test_resume_reports_real_key_mismatches(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, [lora(), checkpoint], max_epochs=1).fit(TinyLlamaModule(), TokensDataModule())
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    saved["state_dict"]["model.not_a_parameter"] = torch.zeros(1)
    del saved["state_dict"]["model.model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight"]
    broken = tmp_path / "broken.ckpt"
    torch.save(saved, broken)
    with pytest.raises(ll.ConfigError, match=r"missing \['model.model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight'\]"):
        trainer(tmp_path, [lora()]).fit(TinyLlamaModule(), TokensDataModule(), ckpt_path=broken)


def test_exports_load_in_peft_and_transformers(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    module = TinyLlamaModule()
    callback = lora(export_dir=str(tmp_path / "export"), export_on_checkpoint=True)
    trainer(tmp_path, [callback, ModelCheckpoint(dirpath=tmp_path / "ckpt")], max_epochs=1).fit(
        module, TokensDataModule())
    assert callback.adapter_dir == tmp_path / "export" / "adapter"
    assert (tmp_path / "export" / "step-8" / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((callback.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert not any(k.startswith("base_model.model.model.model") for k in config["target_modules"])

    tokens = torch.randint(3, 64, (2, 10))
    module.model.eval()
    with torch.no_grad():
        expected = module.model(tokens).logits
        via_peft = peft.PeftModel.from_pretrained(make_llama(), str(callback.adapter_dir)).eval()(tokens).logits
        merged = LlamaForCausalLM.from_pretrained(callback.merged_dir).eval()(tokens).logits
    torch.testing.assert_close(via_peft, expected)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_plain_module_and_bottleneck_adapters(tmp_path: Path) -> None:
    module = PlainModule()
    callback = lora(target_modules=["block.0", "block.2"])
    trainer(tmp_path, [callback], max_epochs=1).fit(module, TokensDataModule())
    assert callback.model is module
    assert (callback.merged_dir / "model.safetensors").is_file()

    llama = TinyLlamaModule()
    houlsby = ll.LoRACallback("houlsby", reduction_factor=4, export_dir=str(callback.adapter_dir.parent))
    with pytest.warns(UserWarning, match="merged export from an earlier run"):  # the plain module's merged/ is left
        trainer(tmp_path, [houlsby], max_epochs=1).fit(llama, TokensDataModule())
    assert houlsby.merged_dir is None and (houlsby.adapter_dir / "adapter_config.json").is_file()
    assert (callback.merged_dir / "model.safetensors").is_file()
    assert len(ll.adapters(llama.model)) == 4


def test_gradient_checkpointing_with_frozen_base(tmp_path: Path) -> None:
    module = TinyLlamaModule(gradient_checkpointing=True)
    trainer(tmp_path, [lora()], max_epochs=1).fit(module, TokensDataModule())
    assert module.losses[-1] < module.losses[0]
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in module.model.named_parameters() if "lora_B" in n)


def test_bad_arguments_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ll.ConfigError, match="takes no option 'reduction_factor'"):
        ll.LoRACallback("lora", reduction_factor=4)
    with pytest.raises(ll.ConfigError, match="set export_merged=False"):
        ll.LoRACallback("pfeiffer", export_merged=True)
    with pytest.raises(ll.ConfigError, match="Unknown method 'loar'.*'lora'"):
        ll.LoRACallback("loar")
    module = TinyLlamaModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ll.ConfigError, match="q_proj"):
        trainer(tmp_path, [lora(target_modules=["q_prj"])]).fit(module, TokensDataModule())
    assert {k: v for k, v in module.state_dict().items()}.keys() == before.keys()
    assert all(p.requires_grad for p in module.parameters())
    with pytest.raises(ll.ConfigError, match="names no submodule"):
        trainer(tmp_path, [lora(model_attr="backbone")]).fit(TinyLlamaModule(), TokensDataModule())


def test_adapters_train_in_float32_over_a_bfloat16_base(tmp_path: Path) -> None:
    module = TinyLlamaModule()
    module.model.to(torch.bfloat16)
    trainer(tmp_path, [lora()], max_epochs=1).fit(module, TokensDataModule())
    params = list(ll.surgery.adapter_parameters(module.model))
    assert {p.dtype for p in params} == {torch.float32}
    assert module.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("precision, half", [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
def test_true_half_precision_keeps_adapters_in_float32(tmp_path: Path, precision: str, half: torch.dtype) -> None:
    import warnings

    module = TinyLlamaModule()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [lora()], max_steps=4, precision=precision).fit(module, TokensDataModule())
    assert not any("adapter weights are" in str(w.message) for w in caught)
    params = list(ll.surgery.adapter_parameters(module.model))
    assert {p.dtype for p in params} == {torch.float32}
    assert module.model.model.layers[0].self_attn.q_proj.weight.dtype == half  # the base is cast as asked
    in_optimizer = [p for group in module.trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in params}
    assert all(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n)


def test_export_once_per_checkpoint_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_lora.callbacks import lora_callback

    steps: list[str] = []
    real = lora_callback.export_step
    monkeypatch.setattr(lora_callback, "export_step", lambda model, directory, *a: (steps.append(directory.name),
                                                                                    real(model, directory, *a)))
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer(tmp_path, [lora(export_dir=str(tmp_path / "export"), export_on_checkpoint=True), every_step],
            max_steps=3).fit(TinyLlamaModule(), TokensDataModule())
    assert steps == ["step-1", "step-2", "step-3"]  # Lightning wrote two files per step (step=N.ckpt, last.ckpt)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["adapter", "merged", "step-1", "step-2",
                                                                       "step-3"]


def test_weights_only_checkpoints_hold_only_the_adapter(tmp_path: Path) -> None:
    module = TinyLlamaModule()
    weights = ModelCheckpoint(dirpath=tmp_path / "w", filename="weights", save_weights_only=True)
    plain = ModelCheckpoint(dirpath=tmp_path / "full", filename="full", save_weights_only=True)
    trainer(tmp_path, [lora(), weights], max_epochs=1).fit(module, TokensDataModule())
    trainer(tmp_path / "bare", [plain], max_epochs=1).fit(TinyLlamaModule(), TokensDataModule())
    saved = torch.load(weights.best_model_path, weights_only=True)
    assert set(saved["state_dict"]) == {f"model.{k}" for k in ll.adapter_state_dict(module.model)}
    assert "optimizer_states" not in saved and saved["lightning_lora"]["method"] == "lora"
    adapter_bytes = Path(weights.best_model_path).stat().st_size
    assert adapter_bytes < Path(plain.best_model_path).stat().st_size / 5

    restored = TinyLlamaModule()
    trainer(tmp_path, [lora()]).validate(restored, TokensDataModule(), ckpt_path=weights.best_model_path)
    expected, actual = ll.adapter_state_dict(module.model), ll.adapter_state_dict(restored.model)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_second_fit_with_other_options_is_refused(tmp_path: Path) -> None:
    module = TinyLlamaModule()
    trainer(tmp_path, [lora(r=4)], max_steps=2).fit(module, TokensDataModule())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ll.ConfigError, match=r"r: 4 in the model vs 2 in the callback.*lightning_lora.unload"):
        trainer(tmp_path, [lora(r=2)], max_steps=2).fit(module, TokensDataModule())
    with pytest.raises(ll.ConfigError, match=r"target_modules: .*q_proj.* in the model vs .*k_proj.* in the callback"):
        trainer(tmp_path, [lora(r=4, target_modules=["k_proj"])], max_steps=2).fit(module, TokensDataModule())
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    trainer(tmp_path, [lora(r=4)], max_steps=4).fit(module, TokensDataModule())  # the same options go on training
    assert not all(torch.equal(before[k], module.state_dict()[k]) for k in before)


def test_a_loaded_adapter_trains_with_matching_options_only(tmp_path: Path) -> None:
    saved = TinyLlamaModule()
    ll.inject(saved.model, lora(dropout=0.0).config, seed=3)
    ll.save_adapter(saved.model, tmp_path / "adapter")
    module = TinyLlamaModule()
    ll.load_adapter(module.model, tmp_path / "adapter")  # records the exact module paths, not the callback's names
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for callback, difference in [
        (lora(r=8), r"r: 4 in the model vs 8 in the callback"),
        (lora(target_modules=["q_proj"]), r"target_modules: \['model.layers.0.self_attn.q_proj', .*\] in the model "
                                          r"vs \['q_proj'\] in the callback"),
        (lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[0]), "layers_to_transform: None in the model"),
        (ll.LoRACallback(r=4), "'all-linear' in the callback"),
    ]:
        with pytest.raises(ll.ConfigError, match=difference):
            trainer(tmp_path, [callback], max_steps=1).fit(module, TokensDataModule())
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    trainer(tmp_path, [lora(dropout=0.0)], max_steps=2).fit(module, TokensDataModule())  # same options: trains on
    assert module.trainer.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if "lora_B" in k)


def test_fsdp1_is_refused_with_the_fix() -> None:
    """FSDP1 is named and refused with the strategies that work (the check ``setup`` runs first); FSDP2 is tested in
    tests/test_fsdp.py, DeepSpeed in tests/test_deepspeed.py."""
    from lightning_lora.callbacks._lightning import unsupported_strategy
    from lightning_lora.callbacks.distributed import check_strategy

    strategy = pl.strategies.FSDPStrategy()
    assert unsupported_strategy(strategy) == "FSDPStrategy"
    with pytest.raises(ll.ConfigError, match="does not support FSDPStrategy yet.*strategy='ddp'.*ModelParallelStrategy"
                                             ".*deepspeed_stage_2"):
        check_strategy(unsupported_strategy(strategy))
    for other in (pl.strategies.DDPStrategy(), pl.strategies.ModelParallelStrategy()):
        assert unsupported_strategy(other) is None


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Lightning builds a Trainer with FSDPStrategy on CUDA only; the refusal is tested above")
def test_fsdp1_trainer_is_refused_in_setup_and_the_model_is_unchanged(tmp_path: Path) -> None:
    trainer = pl.Trainer(accelerator="cuda", devices=1, strategy=pl.strategies.FSDPStrategy(), logger=False,
                         default_root_dir=tmp_path)
    module = TinyLlamaModule()
    with pytest.raises(ll.ConfigError, match="does not support FSDPStrategy yet.*strategy='ddp'"):
        lora().setup(trainer, module, "fit")
    assert not ll.adapters(module.model)


def resume_mid_epoch(tmp_path: Path, stateful: bool) -> tuple[dict, dict, TinyLlamaModule, TinyLlamaModule]:
    """An uninterrupted 20-step run against one stopped at step 13 (epoch 2, batch 5 of 8) and resumed, with
    validation every 3 batches and dropout on; returns both adapters and modules."""
    options = dict(max_steps=20, max_epochs=3, val_check_interval=3, limit_val_batches=2)
    pl.seed_everything(0)
    straight = TinyLlamaModule()
    trainer(tmp_path / "a", [lora(dropout=0.1)], **options).fit(straight, TokensDataModule(stateful=stateful))

    pl.seed_everything(0)
    every_step = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=1, save_last=True)
    trainer(tmp_path / "b", [lora(dropout=0.1), every_step], **{**options, "max_steps": 13}).fit(
        TinyLlamaModule(), TokensDataModule(stateful=stateful))
    resumed = TinyLlamaModule()
    torch.manual_seed(1234)  # resuming must not depend on the RNG state at the time of resume
    trainer(tmp_path / "b", [lora(dropout=0.1), ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)],
            **options).fit(resumed, TokensDataModule(stateful=stateful), ckpt_path="last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 20
    return ll.adapter_state_dict(straight.model), ll.adapter_state_dict(resumed.model), straight, resumed


def test_resume_mid_epoch_with_a_stateful_dataloader_is_exact(tmp_path: Path) -> None:
    pytest.importorskip("torchdata")
    expected, actual, straight, resumed = resume_mid_epoch(tmp_path, stateful=True)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(resumed.losses, straight.losses[13:], rtol=1e-5, atol=1e-6)


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``os.system``: a checkpoint holding it must be refused, not loaded."""

    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_resume_never_unpickles_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading never executes code: the callback's checkpoint reader asks for torch's restricted unpickler
    (weights_only) even where the caller leaves it unset, so a checkpoint carrying a callable object is refused; the
    environment variable makes an unset weights_only mean full unpickling, as older torch releases did."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    module = TinyLlamaModule()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [lora(), checkpoint], max_steps=2).fit(module, TokensDataModule())
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    saved["hyper_parameters"] = {"payload": _RunsCodeWhenUnpickled()}
    torch.save(saved, tmp_path / "tampered.ckpt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        trainer(tmp_path, [lora()], max_steps=4).fit(TinyLlamaModule(), TokensDataModule(),
                                                      ckpt_path=tmp_path / "tampered.ckpt")
