"""What every LoRA benchmark builds: random-weight Llama shapes, the same base for each variant, PEFT's and our adapters
on it, and the small device helpers (synchronize, free, name the card)."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lightning_lora as ll  # noqa: E402
from lightning_lora import surgery  # noqa: E402

# Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json), random weights.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=64)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=256, head_dim=16)


def llama_config(shapes: dict, layers: int | None = None):
    from transformers import LlamaConfig

    kw = dict(shapes)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return LlamaConfig(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_base(config, dtype: torch.dtype, device: str, seed: int) -> nn.Module:
    """A random-weight LlamaForCausalLM built directly on ``device`` (same seed -> same weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def wrap_peft(model: nn.Module, method: str, r: int, alpha: float, bf16_adapters: bool = False,
              dropout: float = 0.0) -> nn.Module:
    """``get_peft_model``; by default (``autocast_adapter_dtype=True``) it upcasts bf16 adapter weights to float32."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        use_dora=(method == "dora"), task_type="CAUSAL_LM")
    return get_peft_model(model, config, autocast_adapter_dtype=not bf16_adapters)


def wrap_ours(model: nn.Module, method: str, r: int, alpha: float, bf16_adapters: bool = False,
              random_b: bool = False, dropout: float = 0.0) -> nn.Module:
    """``inject`` with the library's defaults (float32 adapter weights over a half-precision base); ``bf16_adapters``
    casts the adapter parameters to bfloat16 afterwards, for contrast."""
    ll.inject(model, ll.AdapterConfig.create(method, r=r, alpha=alpha, target_modules="all-linear", dropout=dropout,
                                             init_weights=False if random_b else True))
    if bf16_adapters:
        for p in surgery.adapter_parameters(model):
            p.data = p.data.to(torch.bfloat16)
    return model


def copy_adapters_to_peft(ours: nn.Module, peft: nn.Module, names: list[str]) -> None:
    """Our adapter tensors (``lora_A``, ``lora_B``, ``lora_magnitude_vector``) into PEFT's "default" adapter."""
    with torch.no_grad():
        for path, layer in ll.adapters(ours).items():
            update = layer.adapters["default"]
            theirs = peft.base_model.model.get_submodule(path)
            for name in names:
                mine = getattr(update, name)
                getattr(theirs, name)["default"].weight.copy_(mine.weight if isinstance(mine, nn.Linear) else mine)


def param_dtypes(params) -> str:
    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    return "+".join(sorted({names.get(str(p.dtype), str(p.dtype)) for p in params}))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    """The card (or CPU) as the rows name it."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return "CPU"


def describe_run(device: str) -> str:
    import peft
    import transformers

    line = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"python {sys.version.split()[0]}\n")
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        line += f"device {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        line += f"device {device}"
    return line
