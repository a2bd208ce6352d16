"""Adapters under DeepSpeed ZeRO (stages 2 and 3): whole adapter tensors, gradients and optimizer state in one
process's layout.

ZeRO keeps each trainable tensor's float32 master copy and Adam state as slices of flat per-rank partitions, and
stage 3 also partitions the module's parameters (``param.data`` is empty on every rank, so a plain ``state_dict()``
holds empty adapter tensors: peft #2892). Everything here reads or writes whole tensors through DeepSpeed's public
per-parameter API (``deepspeed.utils.safe_get_full_fp32_param`` and friends, ``deepspeed.zero.GatheredParameters``),
one tensor at a time, adapter tensors only, so that a checkpoint or an export never gathers the frozen base:

- ``trainable_state`` / ``optimizer_state``: what a checkpoint holds, exactly what one process's optimizer would
  (float32 masters; Adam's ``exp_avg``/``exp_avg_sq`` per parameter, indexed as one process numbers them), so a run
  resumes on any world size and strategy; ``load_trainable`` / ``load_optimizer_state`` put them back;
- ``whole_trainable``: a method's whole adapter tensors and gradients lent to a training-loop hook
  (``MethodSpec.regularization``/``after_step``: AdaLoRA, HRA), its changes put back into ZeRO's partitions;
- ``gathered_export``: the whole float32 adapters lent to the module for an export, and the merged state dict
  (``sharded_export.merged_tensors`` with ``_whole_base``: each base tensor gathered on its own under stage 3, merged
  in float32 and handed over).

Every function is a collective (DeepSpeed all-reduces or all-gathers for each tensor): all ranks call it, in the
same order. deepspeed is imported lazily; no Lightning here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn


def is_partitioned(tensor: Any) -> bool:
    """Whether ``tensor`` is a ZeRO-3 parameter (its data lives in per-rank partitions)."""
    return hasattr(tensor, "ds_id")


def full_shape(tensor: Tensor) -> torch.Size:
    """``tensor``'s shape, whole (a ZeRO-3 parameter's own ``shape`` is its empty placeholder's)."""
    return tensor.ds_shape if is_partitioned(tensor) else tensor.shape


def _gathered(params: Iterable[Tensor], modifier_rank: Optional[int] = None) -> Any:
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def has_master(param: Tensor) -> bool:
    """Whether the ZeRO optimizer holds a float32 master of ``param`` (DeepSpeed marks those it holds)."""
    return param.requires_grad and (hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer"))


def _master(param: Tensor) -> Optional[Tensor]:
    """The whole float32 master copy of a parameter the ZeRO optimizer holds (a collective), else None."""
    if not has_master(param):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def whole(param: Tensor) -> Tensor:
    """``param`` whole: its float32 master if the optimizer holds it, else gathered (stage 3) or as it is."""
    master = _master(param)
    if master is not None:
        return master.detach().reshape(full_shape(param))
    with _gathered([param]):
        return param.detach().clone()


def state_shapes(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict with each ZeRO-3 parameter as an empty meta tensor of its full shape (to compare
    shapes and keys without gathering)."""
    return {k: torch.empty(v.ds_shape, device="meta") if is_partitioned(v) else v
            for k, v in module.state_dict(keep_vars=True).items()}


def trainable_state(module: nn.Module, frozen: set[str]) -> dict[str, Tensor]:
    """``module``'s state dict without the ``frozen`` keys, each tensor whole and on the CPU (float32 masters)."""
    return {k: whole(v).cpu() for k, v in module.state_dict(keep_vars=True).items() if k not in frozen}


def load_trainable(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy whole tensors (keys as ``trainable_state`` writes them) into ``module``: the parameter each rank computes
    with (its partition, stage 3) and the optimizer's float32 master."""
    own = module.state_dict(keep_vars=True)
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"load_trainable: {unknown[:5]} are not in {type(module).__name__}'s state dict")
    with torch.no_grad():
        for key, value in state.items():
            _set_whole(own[key], value)


def flat_partitions(zero_optimizer: Any) -> list[Tensor]:
    """This rank's flat float32 partitions, the tensors the wrapped torch optimizer steps and keys its state by
    (ZeRO-3 empties the wrapped optimizer's groups between steps, so they are read from ZeRO's own lists)."""
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # stage 3, stages 1-2
        flats = getattr(zero_optimizer, name, None)
        if flats is not None:
            return list(flats)
    return [p for group in zero_optimizer.optimizer.param_groups for p in group["params"]]


def _link_optimizer_state(zero_optimizer: Any) -> None:
    """Stages 1-2 point each parameter at its slices of the optimizer state once that exists: DeepSpeed links every
    group after the first group's first step, when the later groups' state is still empty (LoRA+'s second group
    then had no Adam state to read), so the links are made again here, once all of it exists."""
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        zero_optimizer._hp_optimizer_states_linked = False
        link()


def optimizer_state(zero_optimizer: Any, groups: list[list[nn.Parameter]], group_options: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    """The ZeRO optimizer's state as the wrapped torch optimizer holds it in one process: ``groups`` are its
    parameter groups (trainable parameters, in order) and ``group_options`` their live option dicts."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = zero_optimizer.optimizer.state
    flats = [f for f in flat_partitions(zero_optimizer) if inner.get(f)]
    state: dict[int, dict[str, Any]] = {}
    if flats:  # torch optimizers create their state at the first step
        _link_optimizer_state(zero_optimizer)
        first = inner[flats[0]]
        per_element = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.shape == flats[0].shape)
        for index, param in enumerate(p for group in groups for p in group):
            # each its own copy: torch optimizers step a parameter's "step" tensor in place
            entry = {k: v.clone() if torch.is_tensor(v) else v for k, v in first.items() if k not in per_element}
            for key in per_element:
                value = safe_get_full_optimizer_state(param, key)
                entry[key] = value.reshape(full_shape(param)).cpu()
            state[index] = dict(sorted(entry.items()))
    param_groups, start = [], 0
    for params, options in zip(groups, group_options):
        param_groups.append({**{k: v for k, v in options.items() if k != "params"},
                             "params": list(range(start, start + len(params)))})
        start += len(params)
    return {"state": state, "param_groups": param_groups}


def check_optimizer_state(groups: list[list[nn.Parameter]], state: dict[str, Any]) -> None:
    """Refuse an optimizer state of other parameter groups than ``groups`` (before anything is loaded)."""
    saved = [len(g["params"]) for g in state["param_groups"]]
    if saved != [len(g) for g in groups]:
        raise ValueError(f"The checkpoint's optimizer has parameter groups of {saved} tensors, this run's "
                         f"{[len(g) for g in groups]}: resume with the configure_optimizers that wrote it.")


def load_optimizer_state(zero_optimizer: Any, groups: list[list[nn.Parameter]], group_options: list[dict[str, Any]],
                         state: dict[str, Any]) -> None:
    """Load a state ``optimizer_state`` (or one process's torch optimizer) wrote into the ZeRO optimizer: its group
    options, the scalar state (``step``) of each flat partition, and each parameter's slices of the rest."""
    check_optimizer_state(groups, state)
    params = [p for group in groups for p in group]
    saved = {int(k): v for k, v in state["state"].items()}
    for options, saved_group in zip(group_options, state["param_groups"]):
        options.update({k: v for k, v in saved_group.items() if k != "params"})
    if not saved:
        return
    first = saved[min(saved)]
    per_element = [k for k, v in first.items() if torch.is_tensor(v) and v.shape == full_shape(params[min(saved)])
                   and v.dim() > 0]
    inner = zero_optimizer.optimizer.state
    for flat in flat_partitions(zero_optimizer):  # as the optimizer's first step would create it
        entry = inner[flat]
        for key, value in first.items():
            if key not in per_element:
                entry[key] = value.clone() if torch.is_tensor(value) else value
        for key in per_element:
            if key not in entry:
                entry[key] = torch.zeros_like(flat)
    _link_optimizer_state(zero_optimizer)
    for index, param in enumerate(params):
        for key in per_element:  # this rank's slice
            _set_full(param, saved[index][key], state_key=key)


@contextlib.contextmanager
def _without_module_hooks(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, ``modules`` (and their submodules) run without forward hooks: ZeRO-3's hooks gather a
    module's parameters around its call, and would fail on the whole plain tensors swapped in for an export or a
    training-loop hook (OFT's rotation, for one, is a module called by its update's ``delta_weight``)."""
    saved = [(m, m._forward_pre_hooks, m._forward_hooks) for module in modules for m in module.modules()]
    try:
        for m, _, _ in saved:
            m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post


@contextlib.contextmanager
def whole_trainable(modules: Iterable[nn.Module], grads: dict[Tensor, Tensor]) -> Iterator[None]:
    """Within the block, the trainable ZeRO parameters of ``modules`` are whole float32 parameters (the optimizer's
    masters) on every rank, each with its whole averaged gradient, so a training-loop hook
    (``MethodSpec.regularization``'s backward before the step, AdaLoRA's allocation after it) runs as in one process.
    ZeRO keeps gradients in its own flat partitions, never in ``.grad``, and drops them at the step: each gradient is
    read before the step (``safe_get_full_grad``) and kept in ``grads`` (the caller's, cleared per batch) for a hook
    after it. On exit, a value the hook changed goes back into the master and the partitions, a gradient it changed
    into ZeRO's gradient partitions (before the step only). A collective (every rank, same order, same whole values)."""
    from deepspeed.utils import safe_get_full_grad

    modules = list(modules)
    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter, Tensor, bool]] = []
    try:
        for module in modules:
            for owner in module.modules():
                for name, param in list(owner._parameters.items()):
                    if param is None or not has_master(param):
                        continue
                    value = whole(param)
                    stepped = param in grads  # read before this batch's step
                    grad = grads[param] if stepped else safe_get_full_grad(param)
                    copy = nn.Parameter(value.clone())
                    copy.grad = None if grad is None else grad.detach().reshape(value.shape).float().clone()
                    owner._parameters[name] = copy
                    swapped.append((owner, name, param, copy, value, stepped))
        with _without_module_hooks(modules):
            yield
    finally:
        for owner, name, param, *_ in reversed(swapped):
            owner._parameters[name] = param
        with torch.no_grad():
            for owner, name, param, copy, value, stepped in swapped:
                if not torch.equal(copy.detach(), value):
                    _set_whole(param, copy.detach())
                if copy.grad is not None:
                    if not stepped:  # before the step: ZeRO's gradient partitions take the hook's gradient
                        _set_full(param, copy.grad, grad=True)
                    grads[param] = copy.grad


def _set_full(param: Tensor, value: Tensor, state_key: Optional[str] = None, grad: bool = False) -> None:
    """A whole ``value`` into this rank's slice of the float32 master of ``param`` (``state_key``: of that optimizer
    state; ``grad``: of its gradient, before the step). Under stage 3 the slice is cut here, padded as ZeRO pads the
    last partition: DeepSpeed's full setters read past the end of a tensor whose size is not a multiple of the world
    size (LLaMA-Adapter's one-element gates failed to load on 2 ranks)."""
    from deepspeed import utils

    value = value.detach().to(param.device, torch.float32)
    if is_partitioned(param):
        size = param.ds_tensor.numel()
        start = param._z3_optimizer._get_param_partition_rank(param) * size
        local = value.flatten()[start:start + size]
        local = torch.cat([local, local.new_zeros(size - local.numel())])
        if grad:
            utils.safe_set_local_grad(param, local)
        elif state_key is not None:
            utils.safe_set_local_optimizer_state(param, local, state_key)
        else:
            utils.safe_set_local_fp32_param(param, local)
        return
    value = value.reshape(param.shape)
    if grad:
        utils.safe_set_full_grad(param, value)
    elif state_key is not None:
        utils.safe_set_full_optimizer_state(param, value, state_key)
    else:
        utils.safe_set_full_fp32_param(param, value)


def _set_whole(target: Tensor, value: Tensor) -> None:
    """A whole tensor into a ZeRO parameter: the optimizer's float32 master (this rank's slice) and the parameter
    each rank computes with (stage 3: its partition). A collective."""
    if has_master(target):
        _set_full(target, value)
    with _gathered([target], modifier_rank=0):  # rank zero's copy goes back into the partitions
        target.data.copy_(value.to(target.device, target.dtype).reshape(target.shape))


@contextlib.contextmanager
def gathered_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s adapter parameters are whole float32 tensors (the optimizer's masters) on every
    rank, so ``save_adapter`` and the merge code read them as in one process; the ZeRO ones are put back on exit."""
    from .methods.base import AdaptedLayer
    from .surgery import adapters

    swapped: list[tuple[nn.Module, str, Tensor]] = []
    # an adapted layer's updates (never the base weight it holds); an inserted adapter whole
    parts = [a.adapters if isinstance(a, AdaptedLayer) else a for a in adapters(model).values()]
    try:
        for owner in (m for part in parts for m in part.modules()):
            for name, tensor in list(owner._parameters.items()):  # buffers are whole on every rank
                if tensor is None:
                    continue
                value = whole(tensor)
                swapped.append((owner, name, tensor))
                owner._parameters[name] = nn.Parameter(value, requires_grad=False)
        with _without_module_hooks(parts):
            yield model
    finally:
        for owner, name, tensor in reversed(swapped):
            owner._parameters[name] = tensor


@contextlib.contextmanager
def _whole_base(tensor: Tensor) -> Iterator[Tensor]:
    """A base tensor whole and dense within the block: gathered alone under ZeRO-3 (``sharded_export.merged_tensors``
    merges it meanwhile), as it is under ZeRO-2."""
    from .methods.base import dense

    with _gathered([tensor]):
        yield dense(tensor.detach())


@contextlib.contextmanager
def gathered_export(model: nn.Module, merged: bool) -> Iterator[Optional[Iterable[tuple[str, Tensor]]]]:
    """Collective, on every rank: whole adapters (``gathered_adapters``) and, with ``merged``, the ``merged_tensors``
    iterator rank zero writes the merged export from, run to its end on leaving so every rank finishes its gathers."""
    from .sharded_export import drain, merged_tensors

    with gathered_adapters(model):
        tensors = merged_tensors(model, _whole_base) if merged else None
        try:
            yield tensors
        finally:
            drain(tensors)
