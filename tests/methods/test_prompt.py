"""Prompt tuning: PEFT's PROMPT_TUNING as the oracle (outputs, files both ways, generation), the inputs it rewrites,
init from text, round trip, unload, options, a real Trainer fit and the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_gpt2, make_llama
from inserted_checks import (
    batch,
    check_bad_option,
    check_cli_fits_and_exports,
    check_fit_lowers_loss,
    check_generate_uses_the_cache_correctly,
    check_round_trip_and_unload,
    check_same_as_peft_files,
)
from tiny_modules import TinyLlamaModule

from lightning_lora.config import AdapterConfig
from lightning_lora.surgery import adapters, inject, parameter_counts

pytestmark = pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_same_as_peft_and_files_load_both_ways(tmp_path: Path, make) -> None:
    import peft

    check_same_as_peft_files(make, "prompt", {"num_virtual_tokens": 3}, tmp_path,
                             peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))


def test_inputs_get_the_prompt_mask_and_ignored_labels() -> None:
    """The model sees [prompt; embedded input] with the mask and labels extended, as PeftModelForCausalLM builds them."""
    base = make_llama()
    model = copy.deepcopy(base)
    inject(model, AdapterConfig.create("prompt", num_virtual_tokens=4), seed=0)
    prompt = model.prompt_encoder.embedding.weight
    assert prompt.shape == (4, 32) and parameter_counts(model)[0] == 4 * 32
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        embeds = torch.cat((prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)), dim=1)
        full_mask = torch.cat((torch.ones(2, 4, dtype=mask.dtype), mask), dim=1)
        full_labels = torch.cat((torch.full((2, 4), -100), labels), dim=1)
        expected = base(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels)
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
        positional = model(ids, mask)  # input_ids and attention_mask given positionally
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(positional.logits, expected.logits, rtol=0, atol=0)


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_generate_with_and_without_cache(make) -> None:
    model = make()
    inject(model, AdapterConfig.create("prompt", num_virtual_tokens=3), seed=0)
    check_generate_uses_the_cache_correctly(model)


class WordTokenizer:
    """A tokenizer stand-in: each word is its length plus 3 (ids inside the tiny vocabulary)."""

    name_or_path = "word-lengths"

    def __call__(self, text: str) -> dict:
        return {"input_ids": [len(w) + 3 for w in text.split()]}


def test_text_init_takes_the_texts_token_embeddings_repeated() -> None:
    model = make_llama()
    config = AdapterConfig.create("prompt", num_virtual_tokens=5, prompt_tuning_init="text",
                                  prompt_tuning_init_text="ab abcd", tokenizer_name_or_path=WordTokenizer())
    inject(model, config)
    words = model.get_input_embeddings().weight[torch.tensor([5, 7, 5, 7, 5])]
    torch.testing.assert_close(model.prompt_encoder.embedding.weight, words, rtol=0, atol=0)
    assert config.to_dict()["tokenizer_name_or_path"] == "word-lengths"


def test_round_trip_and_unload(tmp_path: Path) -> None:
    check_round_trip_and_unload(make_gpt2, "prompt", {"num_virtual_tokens": 3}, tmp_path)


@pytest.mark.parametrize("options,match", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ({"prompt_tuning_init": "vocab"}, "prompt_tuning_init must be one of RANDOM, TEXT, SAMPLE_VOCAB"),
    ({"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "x"}, "needs prompt_tuning_init_text"),
    ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, "needs tokenizer_name_or_path"),
    ({"prompt_tuning_init_text": "hi"}, "used only with prompt_tuning_init='TEXT'"),
    ({"target_modules": ["q_proj"]}, "prompt takes no target_modules"),
    ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi", "tokenizer_name_or_path": "/no/such/dir"},
     "could not be loaded"),
])
def test_bad_options_fail_before_the_model_changes(options: dict, match: str) -> None:
    check_bad_option(make_llama, "prompt", options, match)


def test_fit_lowers_the_loss(tmp_path: Path) -> None:
    # soft prompts want a large learning rate (the paper uses 0.3)
    module = check_fit_lowers_loss(tmp_path, TinyLlamaModule(lr=0.3), method="prompt", num_virtual_tokens=4)
    assert list(adapters(module.model)) == [""]


def test_cli_options(tmp_path: Path) -> None:
    config = check_cli_fits_and_exports(tmp_path, "--lora.method=prompt", "--lora.num_virtual_tokens=2",
                                        "--lora.prompt_tuning_init=SAMPLE_VOCAB")
    assert config == AdapterConfig.create("prompt", num_virtual_tokens=2, prompt_tuning_init="SAMPLE_VOCAB")
