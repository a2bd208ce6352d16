"""Adapters over a base sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): sharding, gathering, loading.

FSDP2 turns each parameter of a sharded module into a ``DTensor`` holding this rank's shard. Everything here touches
adapter (trainable) tensors only, one tensor at a time, so a checkpoint or adapter export never gathers the base:

- ``shard_model`` shards a model *after* injection, block by block, with adapters sharded like the base or kept
  whole on every rank (``adapters="replicated"``: FSDP2's ``ignored_params``; their gradients are then averaged by
  ``average_replicated_grads``, which the callback runs before each optimizer step);
- ``trainable_state`` / ``optimizer_state`` gather what a checkpoint holds (full tensors, keys without the
  ``_orig_mod.``/``_fsdp_wrapped_module.`` parts wrappers add), in the layout one process writes, so a checkpoint
  resumes on any world size and strategy; ``load_trainable`` / ``load_optimizer_state`` put full tensors back
  into sharded parameters, each rank keeping its own shard (no communication);
- ``gathered_adapters`` lends every rank the full adapter tensors for the span of an export;
- ``whole_trainable`` lends a method's training-loop hook (a regularizer's backward, AdaLoRA's rank allocation after
  the step: ``MethodSpec.regularization``/``after_step``) whole parameters and gradients, and keeps each rank's shard
  of what it left. Everything a method does inside the forward needs nothing: FSDP2 gathers each block's parameters
  (adapters and the base weight DoRA, Bone and MiSS read) before its forward.

Every function that gathers is a collective: all ranks call it, in the same order. No Lightning here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded or replicated tensor of torch.distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 or tensor parallelism)."""
    return any(is_dtensor(p) for p in model.parameters())


def full_tensor(tensor: Tensor) -> Tensor:
    """``tensor`` whole: a DTensor is gathered (a collective), any other tensor is returned as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def clean_key(key: str) -> str:
    """A state-dict key without the parts ``torch.compile``, FSDP1 and activation checkpointing wrappers insert."""
    return ".".join(part for part in key.split(".") if part not in WRAPPER_PARTS)


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules of the classes a transformers model lists in
    ``_no_split_modules`` (its decoder layers), else the children of the longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def separate_embeddings(model: nn.Module, blocks: Iterable[nn.Module]) -> list[nn.Module]:
    """The input and output embeddings of a transformers model (``get_input_embeddings``/``get_output_embeddings``)
    when they share no weight and lie outside ``blocks``: ``shard_model`` gives each its own unit, gathered only around
    its own forward and backward. Left in the root unit, which FSDP2 keeps gathered from forward to the end of backward,
    both would be whole on every rank all step (2 x 0.98 GiB at Llama-3.1-8B). Tied ones stay in the root: one weight
    is needed at both ends of the step."""
    from torch.distributed.fsdp import FSDPModule

    inside = {id(m) for block in blocks for m in block.modules()}
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if callable(getattr(model, getter, None)) else None
        except NotImplementedError:
            module = None
        if isinstance(module, nn.Module) and id(module) not in inside and not isinstance(module, FSDPModule):
            found.append(module)
    weights = [id(p) for m in found for p in m.parameters()]
    return found if len(weights) == len(set(weights)) else []


def shard_model(model: nn.Module, mesh: Any = None, *, blocks: Optional[Iterable[nn.Module]] = None,
                adapters: str = "sharded", **fully_shard_kwargs: Any) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to each block of ``model`` and then to ``model``; call it in ``configure_model``
    after the adapters are injected (``LoRACallback`` injects before ``configure_model`` under FSDP2).

    ``adapters="sharded"`` shards adapter tensors with their block (least memory); ``"replicated"`` keeps them whole
    on every rank (no all-gather of adapters in forward; their gradients are averaged before each optimizer step).
    Every method trains either way, several named adapters too (tests/test_fsdp.py). ``mesh``: the data-parallel
    mesh (``self.device_mesh["data_parallel"]`` in a LightningModule); extra keyword arguments go to every
    ``fully_shard`` call (``mp_policy``, ``reshard_after_forward``, ...).
    """
    from torch.distributed.fsdp import fully_shard

    from .surgery import adapter_parameters, adapters as found_adapters

    if adapters not in ("sharded", "replicated"):
        raise ValueError(f"shard_model(adapters={adapters!r}): use 'sharded' or 'replicated'.")
    if not found_adapters(model):
        raise ValueError(
            f"shard_model found no adapters in {type(model).__name__}: inject them first (LoRACallback does so before "
            "configure_model when the model exists in __init__), so that every rank shards the adapted model."
        )
    ignored = set(adapter_parameters(model)) if adapters == "replicated" else None
    blocks = default_blocks(model) if blocks is None else list(blocks)
    for block in blocks + separate_embeddings(model, blocks):
        fully_shard(block, mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    release_unsharded(model)
    return model


def release_unsharded(model: nn.Module) -> None:
    """Point each adapted layer's kept-aside original module at the sharded weight and bias. ``fully_shard`` frees a
    full parameter only once nothing else references it, and the original module (kept outside the module tree for
    ``unload``) still does: without this, every rank keeps the whole base. ``shard_model`` calls it; call it after
    your own ``fully_shard`` calls."""
    from .methods.base import AdaptedLayer

    for module in model.modules():
        if isinstance(module, AdaptedLayer):
            original = module.original_module
            original.weight = module.weight
            if module.bias is not None:
                original.bias = module.bias


def replicated_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of a sharded ``model`` that FSDP2 does not manage (kept whole on every rank)."""
    return [p for p in model.parameters() if p.requires_grad and not is_dtensor(p)]


def average_replicated_grads(params: Iterable[nn.Parameter], group: Any = None) -> None:
    """Average the gradients of parameters kept whole on every rank over ``group`` (one all-reduce of all of them,
    after a small one of which have a gradient anywhere), as DDP with ``find_unused_parameters`` would; FSDP2 reduces
    only the parameters it shards."""
    import torch.distributed as dist

    params = list(params)
    if not params or not dist.is_initialized():
        return
    # a parameter may have a gradient on some ranks only (an adapter none of a rank's examples used): it counts as
    # zero there, as in one process's mean over the global batch, and every rank reduces the same tensors
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(used, op=dist.ReduceOp.MAX, group=group)
    for param, anywhere in zip(params, used.tolist()):
        if anywhere and param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def trainable_state(module: nn.Module, frozen: set[str]) -> dict[str, Tensor]:
    """``module``'s state dict without the ``frozen`` keys, each tensor whole and on the CPU, keys cleaned
    (``clean_key``). Only the tensors kept are gathered, one at a time (a collective)."""
    return {clean_key(k): full_tensor(v.detach()).cpu() for k, v in module.state_dict(keep_vars=True).items()
            if k not in frozen}


def load_trainable(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy the full tensors of ``state`` (keys as ``trainable_state`` writes them) into ``module``; each rank keeps
    its own shard of a DTensor, without communication. Keys must all exist in ``module``."""
    from torch.distributed.tensor import distribute_tensor

    own = {clean_key(k): v for k, v in module.state_dict(keep_vars=True).items()}
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"load_trainable: {unknown[:5]} are not in {type(module).__name__}'s state dict")
    with torch.no_grad():
        for key, value in state.items():
            target = own[key]
            value = value.to(device=target.device, dtype=target.dtype)
            if is_dtensor(target):
                value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
            target.copy_(value)


def _params_in_order(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with each DTensor state gathered to a full CPU tensor (a collective): what the same
    optimizer holds in one process, so any world size can load it (``load_optimizer_state``)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the live state: build new ones
    gathered = {index: {name: full_tensor(value).cpu() if is_dtensor(value) else value
                        for name, value in sorted(state["state"][index].items())}
                for index in sorted(state["state"])}
    return {**state, "state": gathered}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state written by ``optimizer_state`` (or by one process), sharding each state tensor like its
    parameter."""
    from torch.distributed.tensor import distribute_tensor

    params = _params_in_order(optimizer)
    converted = {**state, "state": {}}
    for index, entry in state["state"].items():
        param = params[int(index)]
        converted["state"][index] = {
            name: distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            if is_dtensor(param) and isinstance(value, Tensor) and value.shape == param.shape else value
            for name, value in entry.items()}
    optimizer.load_state_dict(converted)


def method_modules(model: nn.Module, method: str) -> list[nn.Module]:
    """The update modules (``WeightUpdate``) and inserted adapters of ``model`` that method ``method`` built."""
    from .methods.base import AdaptedLayer
    from .surgery import adapters

    found = []
    for adapter in adapters(model).values():
        parts = adapter.adapters.values() if isinstance(adapter, AdaptedLayer) else [adapter]
        found += [part for part in parts if getattr(part, "config", None) is not None and part.config.method == method]
    return found


@contextlib.contextmanager
def whole_trainable(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, the trainable DTensor parameters of ``modules`` are whole plain parameters on every rank,
    with whole gradients, so a training-loop hook (``MethodSpec.regularization``'s backward, AdaLoRA's rank
    allocation after the step) runs as in one process; on exit each rank keeps its shard of the values and gradients
    the hook left. Every rank computes the same whole values, so the shards stay consistent. A collective (a gather
    per tensor, in module order); nothing is gathered for modules without DTensors (DDP, replicated adapters)."""
    from torch.distributed.tensor import distribute_tensor

    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    try:
        for module in modules:
            for owner in module.modules():
                for name, param in list(owner._parameters.items()):
                    if param is None or not param.requires_grad or not is_dtensor(param):
                        continue
                    whole = nn.Parameter(param.detach().full_tensor())
                    if param.grad is not None:
                        whole.grad = param.grad.full_tensor()
                    owner._parameters[name] = whole
                    swapped.append((owner, name, param, whole))
        yield
    finally:
        with torch.no_grad():
            for owner, name, param, whole in reversed(swapped):
                owner._parameters[name] = param

                def shard(value: Tensor) -> Tensor:
                    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)

                param.copy_(shard(whole.detach()))
                if whole.grad is not None:
                    if param.grad is None:
                        param.grad = shard(whole.grad)
                    else:
                        param.grad.copy_(shard(whole.grad))


@contextlib.contextmanager
def gathered_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s adapter tensors are whole plain tensors on every rank (a collective on entry),
    so ``save_adapter`` and the merge code read them as in one process; the sharded ones are put back on exit. The
    base stays sharded."""
    from .methods.base import AdaptedLayer
    from .surgery import adapters

    swapped: list[tuple[nn.Module, str, bool, Tensor]] = []
    try:
        for adapter in adapters(model).values():
            # an adapted layer's updates (never the base weight it holds); an inserted adapter whole
            for owner in (adapter.adapters if isinstance(adapter, AdaptedLayer) else adapter).modules():
                for is_param, store in ((True, owner._parameters), (False, owner._buffers)):
                    for name, tensor in list(store.items()):
                        if not is_dtensor(tensor):
                            continue
                        whole = full_tensor(tensor.detach())
                        swapped.append((owner, name, is_param, tensor))
                        store[name] = nn.Parameter(whole, requires_grad=False) if is_param else whole
        yield model
    finally:
        for owner, name, is_param, tensor in reversed(swapped):
            (owner._parameters if is_param else owner._buffers)[name] = tensor
