"""Tiny real models built from transformers configs (no downloads), shared by every test file."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The models here are far below the size where intra-op parallelism pays; on a loaded 2-core machine each parallel
# region waits for the second thread, which made the suite several times slower. Tests of real models raise it.
torch.set_num_threads(1)

VOCAB = 64


def make_llama(seed: int = 0, layers: int = 2, tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def make_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def make_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


class PlainNet(nn.Module):
    """A plain nn.Module with every layer type LoRA supports."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.conv = nn.Conv1d(16, 16, kernel_size=3, padding=1)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)                              # (B, T, 16)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.block(h)
        return self.head(h.mean(1))


def make_plain(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return PlainNet().eval()


@pytest.fixture
def llama() -> nn.Module:
    return make_llama()


@pytest.fixture
def gpt2() -> nn.Module:
    return make_gpt2()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
