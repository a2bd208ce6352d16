"""Reference outputs of AdapterHub's Houlsby and Pfeiffer adapters, the oracle for tests/methods/test_bottleneck.py.

AdapterHub ``adapters`` 1.3 (Pfeiffer et al.'s reference implementation) pins transformers ~=4.57, so it cannot be
installed next to ours; this script runs in its own environment and writes tensors our test reads:

    python3 -m venv /tmp/ah-venv
    /tmp/ah-venv/bin/pip install torch==2.13.0 adapters==1.3.0 'transformers~=4.57'
    /tmp/ah-venv/bin/python tests/reference/make_bottleneck_reference.py

For each tiny model (the configs of tests/conftest.py, attention-probability dropout off) it saves the base weights,
one token batch, and for each method the adapter weights (AdapterHub's names, random non-zero values) and the
outputs in eval mode and in train mode. In train mode every hidden dropout module is replaced by ``FixedMaskDropout``,
whose mask depends only on the module's path, so the two implementations see the same masks whatever order they
draw them in.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

HERE = Path(__file__).parent
VOCAB = 64
REDUCTION_FACTOR = 4
NONLINEARITY = {"houlsby": "swish", "pfeiffer": "relu"}  # Houlsby at AdapterHub's default; Pfeiffer at its and ours

CONFIGS = {
    "bert": ("BertConfig", "BertForSequenceClassification", {
        "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64, "num_labels": 3,
        "hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.0}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {
        "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": 1,
        "eos_token_id": 2, "resid_pdrop": 0.3, "embd_pdrop": 0.3, "attn_pdrop": 0.0}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "attention_dropout": 0.0}),
}


class FixedMaskDropout(nn.Module):
    """Dropout whose mask is drawn from a generator seeded by the module's path: the same in any implementation."""

    def __init__(self, path: str, p: float) -> None:
        super().__init__()
        self.path, self.p = path, p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        generator = torch.Generator().manual_seed(zlib.crc32(self.path.encode()))
        keep = torch.rand(x.shape, generator=generator) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


def fix_dropout_masks(model: nn.Module) -> list[str]:
    """Replace every ``nn.Dropout`` with p > 0 by a ``FixedMaskDropout``; returns the replaced paths."""
    replaced = []
    for path, module in list(model.named_modules()):
        if type(module) is nn.Dropout and module.p > 0:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, FixedMaskDropout(path, module.p))
            replaced.append(path)
    return replaced


def build(family: str) -> nn.Module:
    import transformers

    config_cls, model_cls, kwargs = CONFIGS[family]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()


def outputs(model: nn.Module, tokens: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        out = model(input_ids=tokens, output_hidden_states=True)
    return {"logits": out.logits, "last_hidden": out.hidden_states[-1]}


def main() -> None:
    import adapters
    import transformers
    from adapters import DoubleSeqBnConfig, SeqBnConfig

    tokens = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    tensors: dict[str, Tensor] = {"tokens": tokens}
    meta: dict = {"adapters": adapters.__version__, "transformers": transformers.__version__,
                  "torch": torch.__version__, "reduction_factor": REDUCTION_FACTOR, "models": {}, "methods": {}}
    for family, (config_cls, model_cls, kwargs) in CONFIGS.items():
        base = build(family)
        masked = fix_dropout_masks(base)
        for name, t in base.state_dict().items():
            tensors[f"{family}/base/{name}"] = t
        for mode in ("eval", "train"):
            base.train(mode == "train")
            for key, t in outputs(base, tokens).items():
                tensors[f"{family}/base/{mode}/{key}"] = t
        meta["models"][family] = {"config_class": config_cls, "model_class": model_cls, "config": kwargs,
                                  "dropout_paths": masked}

        for method, config_cls_ah in (("houlsby", DoubleSeqBnConfig), ("pfeiffer", SeqBnConfig)):
            model = build(family)
            fix_dropout_masks(model)
            adapters.init(model)
            ah_config = config_cls_ah(reduction_factor=REDUCTION_FACTOR, non_linearity=NONLINEARITY[method])
            model.add_adapter(method, config=ah_config)
            model.set_active_adapters(method)
            generator = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if f".adapters.{method}." in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
                        tensors[f"{family}/{method}/adapter/{name}"] = param.detach().clone()
            for mode in ("eval", "train"):
                model.train(mode == "train")
                for key, t in outputs(model, tokens).items():
                    tensors[f"{family}/{method}/{mode}/{key}"] = t
            meta["methods"][method] = {
                "adapterhub_config": type(ah_config).__name__,
                **{k: ah_config[k] for k in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after",
                                             "residual_before_ln", "ln_before", "ln_after", "non_linearity",
                                             "reduction_factor", "scaling", "dropout", "is_parallel",
                                             "init_weights")},
            }
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}  # clone: GPT-2's tied lm_head
    save_file(tensors, str(HERE / "bottleneck_reference.safetensors"))
    (HERE / "bottleneck_reference.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
