"""Stages over several processes: FSDP2-sharded weights under torchrun, passes split by rank.

torchrun starts one process per GPU (on a CPU, one gloo process each: how the tests run it) and
sets RANK / WORLD_SIZE / LOCAL_RANK; `join` enters the process group. Every rank holds the
whole fixed batch (token ids and per-token log-probs, megabytes), so no data is sent. What is
divided is the weights, gradients and AdamW state (`fully_shard` on each decoder layer, then
the root) and the forward passes: each minibatch is packed into passes exactly as on one
device, and rank r runs passes r, r + W, ... Losses are normalised by the whole minibatch's
counts, so the update is the *sum* of the ranks' gradients, which is the single-process
gradient.

FSDP's all-gathers are collectives: every rank must run the same number of forward passes,
or one waits forever. `RankPasses` gives a rank its share of the passes and, when it has fewer
than another rank, filler repeats (weighted zero in a backward); on one process there are none,
so the code that reads a single-device run can skip that loop. Evals generate on every rank
(identical weights, prompts and seeds give identical outputs, so their forwards stay in step);
only the scoring passes are split.

Nothing here is called when WORLD_SIZE is unset or 1: a single process runs as it always did.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True in a process torchrun started for a world of more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> torch.device:
    """Enter torchrun's process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
        return local
    dist.init_process_group("gloo")
    return device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank now: flush, leave the group, and skip interpreter finalisation.

    Finalisation can abort a gloo rank ("terminate called without an active exception",
    SIGABRT, ~1 exit in 10 on this machine) when objects still holding collective work are
    destroyed after the interpreter has begun to tear down; the rank's outputs are all
    written by now, so there is nothing for finalisation to do."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    if code == 0:  # after an error a peer may be stuck in another collective: just go
        with contextlib.suppress(Exception):
            barrier()  # no rank tears down a connection another is still using
            leave()
    os._exit(code)


def barrier() -> None:
    if size() > 1:
        dist.barrier()


# --- work split and reductions --------------------------------------------------------------------
class Split:
    """How the passes of `model` are divided. Over the ranks when it is sharded: its forwards
    are collectives that every rank joins, so each runs a share and the results are summed.
    Otherwise (one process, or a model only this rank scores) all passes run here."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.on = size() > 1 and is_sharded(model)

    def passes(self, passes: Sequence[T]) -> list[tuple[T, bool]]:
        """This rank's passes, each with `real`: every W-th pass (the packer's longest-first
        order spreads the cost), then repeats flagged False until every rank has as many."""
        if not self.on:
            return [(p, True) for p in passes]
        w = size()
        mine = [(p, True) for p in passes[rank() :: w]]
        count = -(-len(passes) // w)
        while len(mine) < count:
            mine.append((passes[0], False))
        return mine

    def sums(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks (fp64, so summed token counts stay exact)."""
        if not self.on:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def sum_(self, t: Tensor) -> Tensor:
        """Sum `t` over ranks in place (each rank filled its own rows, zeros elsewhere)."""
        if self.on:
            _in_place(t, dist.all_reduce)
        return t

    def cat(self, t: Tensor) -> Tensor:
        """Every rank's 1-d tensor (lengths may differ) concatenated in rank order."""
        if not self.on:
            return t
        parts: list[Any] = [None] * size()
        dist.all_gather_object(parts, t.cpu())
        return torch.cat(parts)


class RankPasses(Generic[T]):
    """This rank's share of one minibatch's forward/backward passes, and the filler passes a
    sharded model needs: FSDP's all-gathers are collectives, so a rank with fewer real passes
    runs repeats weighted zero until every rank has run as many. On one process `mine` is every
    pass and `fillers` is empty, so a single-device reader can ignore the second loop."""

    def __init__(self, model: torch.nn.Module, passes: Sequence[T]) -> None:
        self.model, self.split = model, Split(model)
        assigned = self.split.passes(passes)
        self.mine = [p for p, real in assigned if real]
        self.fillers = [p for p, real in assigned if not real]
        self._left = len(assigned)

    def backward(self, loss: Tensor) -> None:
        """Backward one pass; sharded gradients are reduced in this rank's last backward only."""
        self._left -= 1
        sync_gradients(self.model, self._left == 0)
        loss.backward()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any: a stop asked of one rank stops all."""
    if size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_main(value: T) -> T:
    """Rank 0's `value` on every rank."""
    if size() == 1:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _in_place(t: Tensor, collective: Callable[[Tensor], object]) -> None:
    """Run `collective` on `t` where the backend wants it (NCCL: the GPU) and keep the result
    in `t`, wherever `t` lives."""
    moved = t.to(_comm_device())
    collective(moved)
    if moved is not t:
        t.copy_(moved)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- sharding -------------------------------------------------------------------------------------
def shard(model: ModuleT) -> ModuleT:
    """FSDP2 in place: each decoder layer (the model's `_no_split_modules`) is a unit of its
    own, then the root (embeddings, final norm, head). Gradients are summed, not averaged."""
    if size() == 1:
        return model
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)
    for unit in model.modules():
        # per unit, not recursive: a layer left at the default would average its gradients
        # (AdamW hides a scale, so only the gradient norm would show it)
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            # the divide factor would use NCCL's PREMUL_SUM, which gloo lacks: plain sums
            unit.set_force_sum_reduction_for_comms(True)
    return model


def shard_from_main(
    model: ModuleT, weights: dict[str, Any], buffers: dict[str, Tensor], device: torch.device
) -> ModuleT:
    """Shard `model` (built on the meta device on every rank) and fill every rank's shards from
    rank 0's whole `weights` and `buffers`, broadcast one tensor at a time: collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    shard(model)
    model.to_empty(device=device)  # allocated, not yet filled
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    # a copy: loading rewrites the dict it is given, and one read may fill several models
    set_model_state_dict(model, dict(weights), options=options)
    # buffers are not in the state dict when non-persistent (rotary inv_freq): rank 0's values
    for name, buffer in model.named_buffers():
        if is_main():
            buffer.copy_(buffers[name])
        _in_place(buffer, lambda t: dist.broadcast(t, src=0))
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sync_gradients(model: torch.nn.Module, on: bool) -> None:
    """Reduce-scatter gradients in this backward (the minibatch's last pass) or keep them."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(on)


def scalar(t: Tensor) -> float:
    """A (possibly DTensor) 0-d tensor as a float: clip_grad_norm_ on sharded grads is a DTensor."""
    full = getattr(t, "full_tensor", None)
    return float(full() if full is not None else t)


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on rank 0's CPU (empty elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights: dict[str, Tensor] = get_model_state_dict(model, options=options)  # type: ignore[assignment]
    return weights


# --- sharded resume state -------------------------------------------------------------------------
SHARDS = "shards"


class _Flat:
    """Model and AdamW tensors of a (sharded) model under flat names: DCP's safetensors writer
    takes only tensors (param_groups are the config's lr and decay, rebuilt by the loop)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        self.model: dict[str, Any] = dict(get_model_state_dict(model))
        # creates AdamW's state first if no step has run yet
        self.optim: dict[str, Any] = dict(get_optimizer_state_dict(model, optimizer))
        self.tensors: dict[str, Tensor] = {}
        seen: set[int] = set()
        for key, value in self.model.items():
            # a tied head shares the embedding's storage (safetensors refuses shared tensors);
            # it is written once, and loading in place fills both names
            local = value.to_local() if hasattr(value, "to_local") else value
            if local.untyped_storage().data_ptr() in seen:
                continue
            seen.add(local.untyped_storage().data_ptr())
            self.tensors[f"model.{key}"] = value
        for fqn, state in self.optim["state"].items():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    self.tensors[f"optim.{fqn}.{key}"] = value


def save_shards(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its own shards as safetensors (no pickled metadata): collective."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.HuggingFaceStorageWriter(str(directory / SHARDS), save_distributed=True)
    dcp.save(_Flat(model, optimizer).tensors, storage_writer=writer)


def load_shards(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what `save_shards` wrote into the model and optimizer, however many ranks wrote
    it (DCP reshards): collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    flat = _Flat(model, optimizer)  # the shapes and placements to read into, in place
    dcp.load(flat.tensors, storage_reader=dcp.HuggingFaceStorageReader(str(directory / SHARDS)))
    set_model_state_dict(model, flat.model)
    set_optimizer_state_dict(model, optimizer, flat.optim)


@contextlib.contextmanager
def main_writes(make: contextlib.AbstractContextManager[Path]) -> Iterator[Path]:
    """Enter `make` (an atomic_dir) on rank 0 only and hand its temp dir to every rank, so all
    ranks write into one directory that rank 0 commits; the others wait for the commit."""
    if size() == 1:
        with make as tmp:
            yield tmp
        return
    if is_main():
        with make as tmp:
            yield from_main(tmp)
            barrier()  # every rank has written its part
        barrier()  # committed
    else:
        yield from_main(Path())
        barrier()
        barrier()
