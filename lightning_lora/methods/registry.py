"""Every method by name: the one table surgery, io and the callback look methods up in."""

from __future__ import annotations

from ..config import ConfigError
from . import bottleneck, dora, lora
from . import loha, lokr, vera  # additive low-rank family (hada)
from .base import MethodSpec

METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", lora.build_lora, lora.supports_lora, mergeable=True),
    "dora": MethodSpec("dora", dora.build_dora, dora.supports_dora, mergeable=True),
    "houlsby": MethodSpec("houlsby", bottleneck.build_bottleneck, bottleneck.supports_bottleneck, mergeable=False,
                          default_targets=bottleneck.default_sublayers),
    "pfeiffer": MethodSpec("pfeiffer", bottleneck.build_bottleneck, bottleneck.supports_bottleneck, mergeable=False,
                           default_targets=bottleneck.default_sublayers),
    "loha": MethodSpec("loha", loha.build_loha, loha.supports_loha, mergeable=True),
    "lokr": MethodSpec("lokr", lokr.build_lokr, lokr.supports_lokr, mergeable=True),
    "vera": MethodSpec("vera", vera.build_vera, vera.supports_vera, mergeable=True, shared=vera.vera_projections),
}


def method_spec(name: str) -> MethodSpec:
    """The ``MethodSpec`` of method ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None
