"""One-shot wraps of a Lightning object's method, for the gaps no callback hook covers. No Lightning import here."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional


def wrap_once(owner: Any, hook: str, before: Optional[Callable[..., Any]] = None,
              after: Optional[Callable[[], Any]] = None) -> None:
    """Run ``before``/``after`` around the next call of ``owner.<hook>`` only (a LightningModule or precision plugin).

    No callback hook runs between ``configure_model`` and the checkpoint restore, before the restored state dict is
    loaded, nor between the precision plugin's module cast and the optimizers; this bridges those gaps through the
    instance (never the class), and the wrap removes itself after one call (``teardown`` removes it if it never ran).
    """
    original = getattr(owner, hook)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        owner.__dict__.pop(hook, None)
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after()
        return result

    owner.__dict__[hook] = wrapped


def unwrap(owner: Any, *hooks: str) -> None:
    """Remove ``wrap_once``'s wraps of ``hooks`` from ``owner`` that never ran."""
    for hook in hooks:
        owner.__dict__.pop(hook, None)
