#!/usr/bin/env python
"""Inference overhead of the inserted-module methods on the CPU: batch 1 forward time against the base model.

The LoRA paper (Table 1) reports 20-30% extra latency for adapter layers at batch 1. This script builds one small
Llama and one small GPT-2 from configs (no download), injects each method with its default options (LoRA unmerged as
the yardstick of a weight update), and times ``model(input_ids)`` for one sequence: the median of ``--runs`` timed
forwards after a warm-up, interleaved with the base model's so that machine load hits both alike. Trainable
parameter counts are reported on the same models. BitFit runs on GPT-2 only (Llama has no biases); X-LoRA gates two
LoRA experts (r 8 on the attention projections; only its classifier trains) and runs the model twice.

    python benchmarks/inserted_overhead.py                      # the Markdown table on stdout
    python benchmarks/inserted_overhead.py --runs 50 --seq 128 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from lightning_lora.config import AdapterConfig
from lightning_lora.surgery import inject, parameter_counts

METHODS = [("lora", {}), ("houlsby", {}), ("pfeiffer", {}), ("llama_adapter", {}),
           ("prefix", {}), ("prefix", {"prefix_projection": True}), ("prompt", {}), ("bitfit", {}), ("xlora", {})]
EXPERT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def make_llama(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def make_gpt2(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1024, n_embd=hidden, n_layer=layers, n_head=hidden // 64, n_positions=512)
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def median_times(models: list[torch.nn.Module], ids: torch.Tensor, runs: int) -> list[float]:
    """Median seconds per forward of each model, the models timed in turn within each run."""
    for model in models:  # warm-up
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for i, model in enumerate(models):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seq", type=int, default=64, help="tokens in the one input sequence")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    ids = torch.randint(3, 1024, (1, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"batch 1 x {args.seq} tokens, hidden {args.hidden}, {args.layers} layers, {args.threads} thread(s), "
          f"median of {args.runs}; torch {torch.__version__}\n")
    print("| model | method | options | trainable params | % of base | base ms | adapted ms | overhead |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for family, make in (("llama", make_llama), ("gpt2", make_gpt2)):
        base = make(args.hidden, args.layers)
        total = parameter_counts(base)[1]
        for method, options in METHODS:
            if method == "bitfit" and family == "llama":
                continue
            model = copy.deepcopy(base)
            if method == "xlora":  # two LoRA experts (r 8, attention projections) under the classifier
                for seed, expert in enumerate(("a", "b")):
                    inject(model, AdapterConfig.create("lora", target_modules=EXPERT_TARGETS[family]), seed=seed,
                           name=expert)
            inject(model, AdapterConfig.create(method, **options), seed=0,
                   **({"name": "xlora"} if method == "xlora" else {}))
            trainable = parameter_counts(model)[0]
            base_s, adapted_s = median_times([base, model], ids, args.runs)
            shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            print(f"| {family} | {method} | {shown} | {trainable:,} | {100 * trainable / total:.2f} | "
                  f"{1e3 * base_s:.2f} | {1e3 * adapted_s:.2f} | {100 * (adapted_s / base_s - 1):+.1f}% |")


if __name__ == "__main__":
    main()
