"""The callback's compile policy: regional ``torch.compile`` of the model's repeated transformer blocks, and the
compile cache kept beside the run so the next process starts fast.

Why regional: a transformer is one block class repeated N times. Compiling each block (``nn.Module.compile``, in place,
so names, state dicts, hooks and DDP's wrap are unchanged) traces one block once: every block shares the same code
object, and dynamo inlines ``nn.Module`` attributes, so their parameters are graph inputs and all blocks reuse one
graph. The first step then pays for one block's forward and backward, not the whole model's.

What would still recompile, and what is done about it:

- Layer 0's input does not require grad (the embedding is frozen) while every later block's does: dynamo guards on
  ``requires_grad`` and compiles a second training graph. The input embeddings' output is made to require grad while
  training (``uniform_input_grad``), which costs backward one extra input gradient through block 0 (a few % of one
  block's backward) and saves that second compile.
- A transformers model builds a KV cache in training forward when ``config.use_cache`` is on; the cache object's
  growing state changes guards. ``use_cache`` is off while the callback's compile is in force and restored after.
- Shapes: ``dynamic=None`` (torch's default) compiles the first shapes statically and, at the first change of a
  dimension (a shorter last batch, another sequence length), once more with that dimension dynamic; after that no
  shape recompiles. Data padded to one fixed length (or a few multiples of 64) keeps the faster static graph; pass
  ``{"dynamic": False}`` only then (each new length is a new graph, up to dynamo's recompile limit of 8).
- Train and eval are two graphs (``training`` and grad mode are guarded), each compiled once.

The loss: a transformers model computes its loss outside the blocks (``model.loss_function``: the logits upcast to
float32, then cross-entropy). Eager, that keeps a float32 copy of the logits and their log-softmax for backward:
for 4 x 2048 tokens and a 128k vocabulary, about 8 GiB, the largest share of the step's peak once the blocks are
compiled. Where the model has a settable ``loss_function`` (``transformers.PreTrainedModel``), it is compiled too,
which fuses the upcast into the cross-entropy's reduction; nothing else about the loss changes.

The cache: Inductor's FX graph cache and AOTAutograd cache (on by default) live in a per-user temp directory that a
fresh machine does not have. ``torch.compiler.save_cache_artifacts`` serializes what this process compiled (graphs,
kernels, autotuning) into one file, which ``load_cache_artifacts`` puts back into those caches in the next process
before anything compiles, so the second run of the same job finds its graphs instead of compiling them.

This module imports no Lightning package: ``LoRACallback`` calls it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..atomic import atomic_file
from ..config import ConfigError
from ..methods.base import AdaptedLayer
from ..methods.inserted import InsertedAdapter

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_TORCH_KEYS = ("backend", "mode", "dynamic", "fullgraph", "options")
CACHE_FILE = "compile_cache.bin"

CompileOption = Union[bool, str, dict, None]


@dataclasses.dataclass(frozen=True)
class CompilePolicy:
    """What the callback's ``compile=`` option says. ``enabled`` None: on when the Trainer's root device is CUDA.

    ``backend``/``mode``/``dynamic``/``fullgraph``/``options`` go to ``torch.compile`` for each block. ``cache``: True
    keeps the compile cache in ``<export_dir, else default_root_dir/lightning_lora>/compile_cache.bin`` (not
    under ``log_dir``, which a logger numbers anew each run), a path names that file, False keeps none.
    """

    enabled: Optional[bool] = None
    backend: Union[str, Callable] = "inductor"
    mode: Optional[str] = None
    dynamic: Optional[bool] = None
    fullgraph: bool = False
    options: Optional[dict[str, Any]] = None
    cache: Union[bool, str] = True

    def torch_kwargs(self) -> dict[str, Any]:
        kwargs = {k: getattr(self, k) for k in _TORCH_KEYS}
        if kwargs["options"] is None:
            del kwargs["options"]
        return kwargs

    def active(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.enabled is None else self.enabled


def as_compile_policy(value: CompileOption) -> CompilePolicy:
    """The callback's ``compile`` option as a policy: None (on for CUDA), a bool, a mode name, or a dict with the
    keys of ``CompilePolicy`` (``enabled`` may be left out: a dict means on)."""
    if value is None or isinstance(value, bool):
        return CompilePolicy(enabled=value)
    if isinstance(value, str):
        if value not in MODES:
            raise ConfigError(f"compile={value!r} is not a torch.compile mode; use one of {', '.join(MODES)}, true, "
                              "false, or a dict such as {\"mode\": \"max-autotune\", \"dynamic\": false}.")
        return CompilePolicy(enabled=True, mode=value)
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(CompilePolicy)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"compile has no option {', '.join(map(repr, unknown))}; its options are "
                              f"{', '.join(sorted(known))}.")
        if value.get("mode") is not None and value["mode"] not in MODES:
            raise ConfigError(f"compile mode {value['mode']!r} is not one of {', '.join(MODES)}.")
        cache = value.get("cache", True)
        if not isinstance(cache, (bool, str)):
            raise ConfigError(f"compile cache={cache!r} must be true, false or a file path.")
        return CompilePolicy(**{"enabled": True, **value})
    raise ConfigError(f"compile={value!r} must be None, a bool, a mode name ({', '.join(MODES)}) or a dict of "
                      "torch.compile options.")


# -- where to compile -------------------------------------------------------------------------------------------------
def _holds_adapter(module: nn.Module) -> bool:
    return any(isinstance(m, (AdaptedLayer, InsertedAdapter)) for m in module.modules())


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks: the ``nn.ModuleList`` of two or more modules of one class holding adapters
    (``model.layers``, GPT-2's ``transformer.h``, BERT's ``encoder.layer``), the one with most parameters when several
    qualify; empty when there is none. The bottleneck adapters' families (``methods/bottleneck.py``) are such lists."""
    best: list[tuple[str, nn.Module]] = []
    best_size = -1
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1 or not any(_holds_adapter(c) for c in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            prefix = f"{path}." if path else ""
            best, best_size = [(f"{prefix}{i}", child) for i, child in enumerate(module)], size
    return best


# -- compiling and undoing it -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompiledRegions:
    """What ``compile_regions`` changed, so that ``restore`` can undo it (after fit, the model runs eagerly again,
    with its KV cache, for ``generate``)."""

    paths: list[str]
    modules: list[nn.Module]
    use_cache: Optional[tuple[Any, bool]] = None  # (config, the user's value)
    input_grad_hook: Optional[torch.utils.hooks.RemovableHandle] = None
    loss_owner: Optional[nn.Module] = None  # whose loss_function was compiled; its own value is in user_loss
    user_loss: Optional[Callable] = None
    cache_saved: bool = False

    def restore(self) -> None:
        for module in self.modules:
            module._compiled_call_impl = None
        if self.loss_owner is not None:
            if self.user_loss is None:
                del self.loss_owner._loss_function
            else:
                self.loss_owner.loss_function = self.user_loss
            self.loss_owner, self.user_loss = None, None
        if self.use_cache is not None:
            config, value = self.use_cache
            config.use_cache = value
        if self.input_grad_hook is not None:
            self.input_grad_hook.remove()
        self.modules, self.use_cache, self.input_grad_hook = [], None, None


def _require_grad(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)
    return output


def _has_settable_loss(model: nn.Module) -> bool:
    """Whether ``model`` has transformers' ``loss_function`` property with a setter."""
    attribute = getattr(type(model), "loss_function", None)
    return isinstance(attribute, property) and attribute.fset is not None


def compile_regions(model: nn.Module, policy: CompilePolicy, uniform_input_grad: bool = True) -> CompiledRegions:
    """Compile ``model``'s repeated blocks in place (the whole model where it has none), with ``use_cache`` off and,
    for ``uniform_input_grad``, the input embeddings' output requiring grad in training, so every block runs one
    training graph (see the module docstring). Returns what to ``restore``."""
    blocks = repeated_blocks(model)
    if not blocks:
        log.info("lightning_lora: no repeated transformer blocks found in %s; compiling the whole model",
                 type(model).__name__)
        blocks = [("", model)]
    kwargs = policy.torch_kwargs()
    done = CompiledRegions([p for p, _ in blocks], [m for _, m in blocks])
    for path, module in blocks:
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(**kwargs)
            log.debug("lightning_lora: compiled %s", path or type(module).__name__)
    if blocks[0][1] is not model and _has_settable_loss(model):
        done.loss_owner, done.user_loss = model, model.__dict__.get("_loss_function")
        model.loss_function = torch.compile(model.loss_function, **kwargs)
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        done.use_cache = (config, config.use_cache)
        config.use_cache = False
    embeddings = getattr(model, "get_input_embeddings", None)
    if uniform_input_grad and len(blocks) > 1 and callable(embeddings):
        try:
            module = embeddings()
        except NotImplementedError:
            module = None
        if isinstance(module, nn.Module):
            done.input_grad_hook = module.register_forward_hook(_require_grad)
    return done


# -- the compile cache across processes ------------------------------------------------------------------------------
def cache_path(policy: CompilePolicy, default_dir: Union[str, Path]) -> Optional[Path]:
    """Where this run's compile cache file is: ``policy.cache`` when it is a path, else ``default_dir``'s
    ``compile_cache.bin``; None when the cache is off."""
    if policy.cache is False:
        return None
    if isinstance(policy.cache, str):
        return Path(policy.cache)
    return Path(default_dir) / CACHE_FILE


def load_cache(path: Optional[Path]) -> bool:
    """Put the artifacts of an earlier run (``save_cache``) into this process's Inductor and AOTAutograd caches, before
    anything compiles. Returns whether a file was loaded; an unreadable or foreign file is logged and ignored (the run
    then compiles from scratch)."""
    if path is None or not path.is_file():
        return False
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - a stale cache must never stop training
        log.warning("lightning_lora: ignoring the compile cache %s (%s: %s); compiling from scratch. Delete the file "
                    "to silence this.", path, type(err).__name__, err)
        return False
    log.info("lightning_lora: compile cache loaded from %s (%s)", path, info)
    return info is not None


def save_cache(path: Optional[Path]) -> bool:
    """Write what this process compiled so far (graphs, kernels, autotuning) to ``path``, atomically. Returns whether
    there was anything to write."""
    if path is None:
        return False
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        return False
    with atomic_file(path, "compile cache") as temp:
        temp.write_bytes(saved[0])
    log.info("lightning_lora: compile cache written to %s (%d bytes)", path, len(saved[0]))
    return True
