"""Every method by name: the one table surgery, io and the callback look methods up in."""

from __future__ import annotations

from ..config import ConfigError
from . import bottleneck, dora, lora
from . import boft, bone, hra, oft
from . import loha, lokr, vera  # additive low-rank family (hada)
from . import adalora
from . import bitfit, llama_adapter, prefix, prompt, xlora  # inserted family (issue 11)
from .base import MethodSpec
from .inserted import whole_model

METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", lora.build_lora, lora.supports_lora, mergeable=True),
    "dora": MethodSpec("dora", dora.build_dora, dora.supports_dora, mergeable=True),
    "adalora": MethodSpec("adalora", adalora.build_adalora, adalora.supports_adalora, mergeable=True,
                          regularization=adalora.orthogonality_loss, after_step=adalora.allocate),
    "houlsby": MethodSpec("houlsby", bottleneck.build_bottleneck, bottleneck.supports_bottleneck, mergeable=False,
                          default_targets=bottleneck.default_sublayers),
    "pfeiffer": MethodSpec("pfeiffer", bottleneck.build_bottleneck, bottleneck.supports_bottleneck, mergeable=False,
                           default_targets=bottleneck.default_sublayers),
    "oft": MethodSpec("oft", oft.build_oft, oft.supports_oft, mergeable=True),
    "boft": MethodSpec("boft", boft.build_boft, boft.supports_boft, mergeable=True),
    "hra": MethodSpec("hra", hra.build_hra, hra.supports_hra, mergeable=True,
                      regularization=hra.orthogonality_regularizer),
    "bone": MethodSpec("bone", bone.build_bone, bone.supports_bone, mergeable=True),
    "miss": MethodSpec("miss", bone.build_bone, bone.supports_bone, mergeable=True),
    "loha": MethodSpec("loha", loha.build_loha, loha.supports_loha, mergeable=True),
    "lokr": MethodSpec("lokr", lokr.build_lokr, lokr.supports_lokr, mergeable=True),
    "vera": MethodSpec("vera", vera.build_vera, vera.supports_vera, mergeable=True, shared=vera.vera_projections),
    "llama_adapter": MethodSpec("llama_adapter", llama_adapter.build_llama_adapter,
                                llama_adapter.supports_llama_adapter, mergeable=False,
                                find_targets=llama_adapter.find_targets),
    "prefix": MethodSpec("prefix", prefix.build_prefix, prefix.supports_prefix, mergeable=False,
                         find_targets=whole_model),
    "prompt": MethodSpec("prompt", prompt.build_prompt, prompt.supports_prompt, mergeable=False,
                         find_targets=whole_model),
    "bitfit": MethodSpec("bitfit", bitfit.build_bitfit, bitfit.supports_bitfit, mergeable=True,
                         default_targets=bitfit.default_targets),
    "xlora": MethodSpec("xlora", xlora.build_xlora, xlora.supports_xlora, mergeable=False, find_targets=whole_model),
}


def method_spec(name: str) -> MethodSpec:
    """The ``MethodSpec`` of method ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None
