"""The callback's compile option (``plugins/compile.py``): regional compile of the repeated blocks without graph breaks
or recompiles, the same training as eager inside ``Trainer.fit``, and the compile cache reused by a second process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import lightning_lora as ll
from conftest import make_bert, make_gpt2, make_llama
from lightning_lora.config import ConfigError
from lightning_lora.plugins.compile import CompilePolicy, as_compile_policy, compile_regions, repeated_blocks
from tiny_modules import TinyLlamaModule, TokensDataModule, trainer

MODELS = {"llama": make_llama, "gpt2": make_gpt2, "bert": make_bert}


class CountingBackend:
    """A torch.compile backend that runs graphs as traced and records which frame each compile was for and how many
    times that frame had been compiled before (``frame_compile_id`` > 0 is a recompile)."""

    def __init__(self) -> None:
        self.compiles: list[tuple[int, int]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        compile_id = torch._guards.CompileContext.current_compile_id()
        self.compiles.append((compile_id.frame_id, compile_id.frame_compile_id))
        return gm.forward


def adapted(model_name: str, method: str) -> torch.nn.Module:
    model = MODELS[model_name]().train()
    options = dict(r=4, target_modules="all-linear") if method in ("lora", "dora") else {}
    ll.inject(model, ll.AdapterConfig.create(method, **options))
    return model


def batch(model_name: str, length: int = 9) -> dict:
    ids = torch.randint(3, 64, (2, length), generator=torch.Generator().manual_seed(length))
    return dict(input_ids=ids, labels=torch.tensor([0, 1]) if model_name == "bert" else ids)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


CASES = [("llama", m) for m in ("lora", "dora", "houlsby")] + [("gpt2", "pfeiffer"), ("bert", "houlsby")]


@pytest.mark.parametrize(("model_name", "method"), CASES)
def test_blocks_compile_once_per_mode_without_graph_breaks(model_name: str, method: str) -> None:
    """One training graph serves every block (layer 0 included: its input is made to require grad), one eval graph;
    a second epoch of train/eval switches compiles nothing more, and nothing breaks the graph."""
    model = adapted(model_name, method)
    backend = CountingBackend()
    regions = compile_regions(model, CompilePolicy(enabled=True, backend=backend))
    assert len(regions.paths) == 2 and regions.paths[0].endswith(".0")
    inputs = batch(model_name)
    phases = []
    for epoch in range(2):
        model.train()
        model(**inputs).loss.backward()
        model(**inputs).loss.backward()
        phases.append(list(backend.compiles))
        model.eval()
        with torch.inference_mode():
            model(**inputs)
        phases.append(list(backend.compiles))
    assert not counters["graph_break"], dict(counters["graph_break"])
    train, evaluation = phases[0], phases[1][len(phases[0]):]
    frames = {frame for frame, _ in train}
    assert all(n == 0 for _, n in train), f"recompiled in training: {train}"  # layer 0 shares the blocks' graph
    assert sorted(frame for frame, _ in evaluation) == sorted(frames) and all(n == 1 for _, n in evaluation)
    assert phases[3] == phases[1], "the second epoch compiled again"
    regions.restore()
    assert all(block._compiled_call_impl is None for _, block in repeated_blocks(model))


def test_changing_sequence_length_recompiles_once() -> None:
    """dynamic=None: the first change of a length compiles one dynamic graph, which serves every later length; the
    same holds for the block frame and the model's compiled loss."""
    model = adapted("llama", "lora")
    backend = CountingBackend()
    compile_regions(model, CompilePolicy(enabled=True, backend=backend))
    for length in (9, 7, 5, 11, 6):
        model(**batch("llama", length)).loss.backward()
    per_frame: dict[int, list[int]] = {}
    for frame, n in backend.compiles:
        per_frame.setdefault(frame, []).append(n)
    assert list(per_frame.values()) == [[0, 1], [0, 1]], backend.compiles  # the blocks' frame and the loss's
    assert not counters["graph_break"]


def test_the_models_loss_is_compiled_and_restored() -> None:
    """A transformers model's loss (float32 upcast of the logits + cross-entropy, outside the blocks) is compiled with
    them, so its float32 copies are fused away; the same loss values, and the user's own loss function comes back."""
    model = adapted("llama", "lora")
    inputs = batch("llama")
    eager_loss = model(**inputs).loss.detach()
    user_loss = model.loss_function
    model.loss_function = user_loss  # a loss the user set stays theirs after restore
    regions = compile_regions(model, CompilePolicy(enabled=True, backend="aot_eager"))
    assert model.loss_function is not user_loss
    torch.testing.assert_close(model(**inputs).loss, eager_loss)
    regions.restore()
    assert model.loss_function is user_loss
    del model._loss_function
    regions = compile_regions(model, CompilePolicy(enabled=True, backend="eager"))
    regions.restore()
    assert "_loss_function" not in model.__dict__ and model.loss_function is user_loss


def test_use_cache_off_while_compiled_and_restored() -> None:
    model = adapted("llama", "lora")
    assert model.config.use_cache
    regions = compile_regions(model, CompilePolicy(enabled=True, backend="eager"))
    assert model.config.use_cache is False
    regions.restore()
    assert model.config.use_cache is True


def test_options_are_checked_up_front() -> None:
    assert as_compile_policy(None).active(torch.device("cuda")) and not as_compile_policy(None).active(torch.device("cpu"))
    assert as_compile_policy(True).active(torch.device("cpu"))
    assert not as_compile_policy(False).active(torch.device("cuda"))
    assert as_compile_policy("max-autotune").mode == "max-autotune"
    assert as_compile_policy({"dynamic": False}).torch_kwargs()["dynamic"] is False
    with pytest.raises(ConfigError, match="not a torch.compile mode"):
        ll.LoRACallback(compile="fast")
    with pytest.raises(ConfigError, match="no option 'dynamc'"):
        ll.LoRACallback(compile={"dynamc": False})


def _fit(tmp_path: Path, compile_option, name: str) -> tuple[list[float], torch.nn.Module, dict]:
    torch.manual_seed(0)
    module = TinyLlamaModule()
    seen = {}

    class Check(ll.LoRACallback):
        def on_train_start(self, trainer, pl_module) -> None:
            super().on_train_start(trainer, pl_module)
            seen["compiled"] = [b._compiled_call_impl is not None for _, b in repeated_blocks(self.model)]
            seen["use_cache"] = self.model.config.use_cache

    callback = Check(r=4, dropout=0.1, compile=compile_option)
    trainer(tmp_path / name, [callback], max_epochs=2, limit_train_batches=2, enable_checkpointing=False,
            limit_val_batches=1).fit(module, TokensDataModule())
    return module.losses, module.model, seen


def test_fit_compiled_trains_as_eager(tmp_path: Path) -> None:
    """Explicitly on (the default is off on CPU): the same losses as eager, dropout included, with train/eval switches;
    after fit the model is eager again with its KV cache on."""
    eager_losses, _, eager_seen = _fit(tmp_path, None, "eager")
    assert eager_seen["compiled"] == [False, False]  # None: off on the CPU
    losses, model, seen = _fit(tmp_path, {"backend": "aot_eager", "cache": False}, "compiled")
    assert seen == {"compiled": [True, True], "use_cache": False}
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert losses[-1] < losses[0]
    assert not counters["graph_break"]
    assert all(b._compiled_call_impl is None for _, b in repeated_blocks(model)) and model.config.use_cache


RUN = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from torch import nn
    from torch._dynamo.utils import counters
    import pytorch_lightning as pl
    import lightning_lora as ll

    class Blocks(pl.LightningModule):  # adapted blocks that are matmuls only: Inductor compiles little C++ on the CPU
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(64, 16)
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
            self.head = nn.Linear(16, 64)
            self.losses = []

        def training_step(self, batch, batch_idx):
            h = self.embed(batch[:, :-1])
            for layer in self.layers:
                h = h + layer(h)
            loss = nn.functional.cross_entropy(self.head(h).flatten(0, 1), batch[:, 1:].flatten())
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.randint(0, 64, (8, 9), generator=torch.Generator().manual_seed(0)),
                                       batch_size=4)
    module = Blocks()
    callback = ll.LoRACallback(r=4, target_modules=r"layers\\.\\d", compile={"cache": sys.argv[1], "fullgraph": True})
    pl.Trainer(callbacks=[callback], accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, default_root_dir=sys.argv[2]).fit(module, data)
    print(json.dumps({"losses": module.losses, "inductor": dict(counters["inductor"]),
                      "aot": dict(counters["aot_autograd"])}))
""")


@pytest.mark.slow  # two processes that import Lightning and run Inductor: about a minute on a loaded 2-core machine
def test_second_process_hits_the_compile_cache(tmp_path: Path) -> None:
    """Two processes, each with its own empty Inductor cache directory: the first compiles (Inductor, adapter blocks
    with fullgraph=True) and writes the cache file, the second loads it and finds every graph there (FX graph and
    AOTAutograd cache hits, no misses) and trains the same."""
    root = Path(__file__).parents[1]
    cache = tmp_path / "compile_cache.bin"
    results = []
    for run in range(2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{run}"),
               "TORCHINDUCTOR_COMPILE_THREADS": "1", "PYTHONPATH": str(root)}
        done = subprocess.run([sys.executable, "-c", RUN, str(cache), str(tmp_path / f"run-{run}")], env=env,
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if run == 0:
            assert cache.is_file() and cache.stat().st_size > 0
    first, second = results
    assert first["inductor"].get("fxgraph_cache_miss", 0) > 0 and not first["inductor"].get("fxgraph_cache_hit")
    assert second["inductor"].get("fxgraph_cache_hit", 0) > 0 and not second["inductor"].get("fxgraph_cache_miss")
    assert second["aot"].get("autograd_cache_hit", 0) > 0 and not second["aot"].get("autograd_cache_miss")
    assert second["losses"] == pytest.approx(first["losses"], rel=1e-6)


def test_cli_flag(tmp_path: Path) -> None:
    """``--lora.compile`` takes a dict (as JSON) as well as true/false or a mode name."""
    flag = '{"backend": "eager", "dynamic": false, "cache": false}'
    expected = CompilePolicy(enabled=True, backend="eager", dynamic=False, cache=False)
    from lightning_lora.cli import build_cli

    cli = build_cli(["fit", "--model=tiny_modules.TinyLlamaModule", "--data=tiny_modules.TokensDataModule",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
                     "--trainer.enable_model_summary=false", "--trainer.max_steps=1", "--lora.r=2",
                     f"--trainer.default_root_dir={tmp_path}", f"--lora.compile={flag}"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LoRACallback)]
    assert callback.compile_policy == expected
