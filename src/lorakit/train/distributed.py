"""How `lorakit train` runs: in one process, or in several under torchrun with torch.distributed.

The training loop asks its strategy everything that depends on the number of processes: the
device, how the model is wrapped, which examples of a global micro-batch this process takes, how
numbers are summed over processes, and whether this process writes files (only the main one does).

    torchrun --nproc_per_node 2 -m lorakit train ...     # or: lorakit train --nproc 2 ...

DDP (`torch.nn.parallel.DistributedDataParallel`) averages the gradients of the trainable
parameters (the adapters; the frozen base has none) in its own bucketed all-reduce, overlapped with
backward. The global batch is batch_size x processes x grad_accum; process r takes rows
[r*batch_size, (r+1)*batch_size) of each global micro-batch, so a run on N processes sees the same
examples, in the same order, as one process with N times the batch.

FSDP2 (`--distributed fsdp`, `torch.distributed.fsdp.fully_shard`) shards the frozen base instead of
copying it into every process: each repeated block (a decoder layer) is one shard unit, the rest of
the model the root unit, and each process holds 1/N of every base weight (4-bit layers included:
their packed storage becomes frozen parameters, `Linear4bit.make_shardable`). The adapters are left
out of the sharding (`ignored_params`): they are a small fraction of the model, and whole adapters
on every process keep every method's own code as it is (AdaLoRA's global ranking of triplets, its
mid-run rebuild of adapters, LoRA+ groups, checkpoints of whole tensors and optimizer state). Their
gradients are averaged by one flat all-reduce per optimizer step (`reduce_gradients`). Base weights
read or written outside forward go through `base_layers` (the one door), which gathers a sharded
weight and writes back only the local rows.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class SingleProcess:
    """One process: everything is local."""

    rank = 0
    world_size = 1
    is_main = True
    kind = "single"  # what the report calls this way of running
    # True where the base is sharded over processes: a forward then needs every process (evaluation
    # runs everywhere), and the model reaches its device by sharding (`place`)
    sharded = False

    def device(self, requested: str) -> torch.device:
        if requested == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if requested == "cuda" and not torch.cuda.is_available():
            raise LorakitError("device cuda requested but no CUDA GPU is available")
        return torch.device(requested)

    def place(self, model: nn.Module, device: torch.device) -> None:
        """Put the adapted model on `device`, once it is built: a whole model is there already
        (moved before adapting); a sharded one is sharded onto it here."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls (the model itself here)."""
        return model

    def reduce_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Average the trainable parameters' gradients over processes, where the wrapper does not."""

    def gathered(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A block in which the main process alone may read every base weight it saves."""
        return contextlib.nullcontext()

    def shard(self, examples: list) -> list:
        """This process's part of a global micro-batch."""
        return examples

    def sum(self, values: list[float]) -> list[float]:
        """`values` summed over processes."""
        return values

    def any(self, flag: bool) -> bool:
        """True when `flag` is true in any process."""
        return flag

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, in every process."""
        return obj

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (on every process)."""
        return [obj]

    def barrier(self) -> None:
        pass

    def no_sync(self, module: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient exchange on micro-batches before the last of an accumulation."""
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


class DataParallel(SingleProcess):
    """Several processes started by torchrun, one model replica each, gradients averaged by DDP."""

    kind = "ddp"

    def __init__(self, backend: str | None = None, timeout_s: float = 600.0, device: str = "auto") -> None:
        import torch.distributed as dist

        from .launch import RENDEZVOUS_VARIABLE

        rendezvous = os.environ.get(RENDEZVOUS_VARIABLE)  # `lorakit train --nproc`: a file, no TCP store
        if rendezvous:
            from ..children import follow_parent

            follow_parent()  # whatever the script, a process of a launch ends with its launcher
        needed = TORCHRUN_VARIABLES if not rendezvous else ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        missing = [v for v in needed if v not in os.environ]
        if missing:
            raise LorakitError(
                f"a distributed run needs torchrun's environment ({', '.join(missing)} not set): start it "
                "with `torchrun --nproc_per_node N -m lorakit train ...` or `lorakit train --nproc N ...`"
            )
        if not dist.is_available():
            raise LorakitError("this PyTorch build has no torch.distributed")
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.is_main = self.rank == 0
        use_cuda = torch.cuda.is_available() and device != "cpu"  # --device cpu on a GPU machine: gloo
        backend = backend or ("nccl" if use_cuda else "gloo")
        available = {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(), "mpi": dist.is_mpi_available()}
        if not available.get(backend, False):
            raise LorakitError(
                f"the {backend} backend is not available in this PyTorch build; available: "
                f"{', '.join(b for b, ok in available.items() if ok) or 'none'}"
            )
        if use_cuda and backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            # a process that dies leaves the others waiting in a collective: they give up after the timeout
            timeout = datetime.timedelta(seconds=timeout_s)
            if rendezvous:
                dist.init_process_group(
                    backend,
                    init_method=f"file://{rendezvous}",
                    rank=self.rank,
                    world_size=self.world_size,
                    timeout=timeout,
                )
            else:
                dist.init_process_group(backend, timeout=timeout)
        self.backend = backend
        self._dist = dist
        self._ddp: nn.Module | None = None

    def device(self, requested: str) -> torch.device:
        if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise LorakitError("device cuda requested but no CUDA GPU is available")
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over the model: only parameters that require grad (the adapters, trained heads) are
        registered and reduced. DDP also broadcasts them from the main process, so every replica
        starts from the same adapter. Call again after the adapters are rebuilt."""
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model.device.index] if getattr(model, "device", torch.device("cpu")).type == "cuda" else None
        # buffers (AdaLoRA's masks, VeRA's projections) are the same on every process by construction:
        # synced once at the start, not before every forward
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        self._ddp = DistributedDataParallel(model, device_ids=device_ids, **sync)
        return self._ddp

    def shard(self, examples: list) -> list:
        per_process = len(examples) // self.world_size
        if per_process == 0:
            raise LorakitError(
                f"a global micro-batch of {len(examples)} examples cannot be split over {self.world_size} processes"
            )
        return examples[self.rank * per_process : (self.rank + 1) * per_process]

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        self._dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def broadcast(self, obj: Any) -> Any:
        holder = [obj]
        self._dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self._dist.barrier()

    def no_sync(self, module: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        if last_micro_batch or not hasattr(module, "no_sync"):
            return contextlib.nullcontext()
        return module.no_sync()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


class FullyShard(DataParallel):
    """Several processes started by torchrun, the frozen base sharded over them by FSDP2, whole
    adapters on every process (see the module docstring)."""

    kind = "fsdp"
    sharded = True

    def place(self, model: nn.Module, device: torch.device) -> None:
        """Shard each repeated block, then the root, over all processes on `device`; adapters and
        buffers (VeRA's shared projections: one tensor per process, never one per shard unit) stay
        whole. The base may arrive on the CPU: only each process's shard moves to the device."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from ..quant.linear4bit import Linear4bit

        for module in model.modules():
            if isinstance(module, Linear4bit):
                module.make_shardable()
        trainable = {p for p in model.parameters() if p.requires_grad}
        mesh = init_device_mesh(device.type, (self.world_size,))
        for block in reversed(repeated_blocks(model)):  # inner blocks before any block holding them
            fully_shard(block, mesh=mesh, ignored_params=trainable)
        fully_shard(model, mesh=mesh, ignored_params=trainable)
        move_whole_tensors(model, device)
        with torch.no_grad():  # every process starts from the main process's adapters (as DDP does)
            for p in _in_model_order(model, trainable):
                self._dist.broadcast(p.data, src=0)

    def wrap(self, model: nn.Module) -> nn.Module:
        # sharded in place by `place`; the adapters' gradients are averaged by `reduce_gradients`
        return model

    def no_sync(self, module: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        # nothing is exchanged per micro-batch: the frozen base has no gradient, the adapters' are
        # averaged once per optimizer step
        return contextlib.nullcontext()

    def reduce_gradients(self, parameters: list[nn.Parameter]) -> None:
        """One all-reduce per dtype over the flattened gradients, then divided by the process count.
        A parameter without a gradient has none on every process (the same graph): it is skipped,
        as the optimizer skips it."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in parameters:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._dist.all_reduce(flat)
            flat.div_(self.world_size)
            for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))

    def gathered(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Every process gathers the base weights of adapters that move them (Delta-LoRA, whose file
        holds them); the main process keeps them (on the CPU) for the length of the block."""
        from .. import base_layers, inject

        names = [n for n in inject.adapter_names(model) if inject.adapter_config(model, n).moves_base_weights]
        bases = [layer.base_layer for n in names for _, layer in inject.adapted_layers(model, n)]
        return base_layers.gathered_weights(bases, keep=self.is_main)


def _in_model_order(model: nn.Module, chosen: set[nn.Parameter]) -> list[nn.Parameter]:
    """`chosen`, in the model's parameter order (the same on every process: collectives line up)."""
    return [p for p in model.parameters() if p in chosen]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, one FSDP unit each: the classes transformers names in
    `_no_split_modules` (e.g. LlamaDecoderLayer), else the children of the largest `nn.ModuleList`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return []
    largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(largest)


def move_whole_tensors(model: nn.Module, device: torch.device) -> None:
    """Move what FSDP left where it was (the adapters it ignores, buffers of modules it does not
    manage) to `device`; the sharded parameters are there already. In place: the optimizer and the
    training hooks are built afterwards, from these same tensors."""
    from ..base_layers import is_sharded

    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and not is_sharded(p) and p.device != device:
                p.data = p.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def strategy_for(world: str = "auto", device: str = "auto") -> SingleProcess:
    """`world` = "fsdp": FSDP2 (under torchrun); "ddp", or "auto" when started by torchrun with more
    than one process: DDP; else one process. `device` (the run's) picks the backend: NCCL for CUDA."""
    if world == "fsdp":
        return FullyShard(device=device)
    if world == "ddp" or (world == "auto" and launched_by_torchrun()):
        return DataParallel(device=device)
    return SingleProcess()


@contextlib.contextmanager
def running(strategy: SingleProcess) -> Iterator[SingleProcess]:
    """Tear the process group down however the run ends."""
    try:
        yield strategy
    finally:
        strategy.close()
