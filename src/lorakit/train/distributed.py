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
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
from torch import nn

from .errors import LorakitError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class SingleProcess:
    """One process: everything is local."""

    rank = 0
    world_size = 1
    is_main = True

    def device(self, requested: str) -> torch.device:
        if requested == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if requested == "cuda" and not torch.cuda.is_available():
            raise LorakitError("device cuda requested but no CUDA GPU is available")
        return torch.device(requested)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls (the model itself here)."""
        return model

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

    def __init__(self, backend: str | None = None, timeout_s: float = 600.0) -> None:
        import torch.distributed as dist

        missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
        if missing:
            raise LorakitError(f"a distributed run needs torchrun's environment ({', '.join(missing)} not set): start it "
                               "with `torchrun --nproc_per_node N -m lorakit train ...` or `lorakit train --nproc N ...`")
        if not dist.is_available():
            raise LorakitError("this PyTorch build has no torch.distributed")
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.is_main = self.rank == 0
        use_cuda = torch.cuda.is_available()
        backend = backend or ("nccl" if use_cuda else "gloo")
        available = {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(), "mpi": dist.is_mpi_available()}
        if not available.get(backend, False):
            raise LorakitError(f"the {backend} backend is not available in this PyTorch build; available: "
                               f"{', '.join(b for b, ok in available.items() if ok) or 'none'}")
        if use_cuda and backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            # a process that dies leaves the others waiting in a collective: they give up after the timeout
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
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
        from torch.nn.parallel import DistributedDataParallel

        import inspect

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
            raise LorakitError(f"a global micro-batch of {len(examples)} examples cannot be split over {self.world_size} processes")
        return examples[self.rank * per_process:(self.rank + 1) * per_process]

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


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def strategy_for(world: str = "auto") -> SingleProcess:
    """DDP when started by torchrun with more than one process, else one process."""
    if world == "ddp" or (world == "auto" and launched_by_torchrun()):
        return DataParallel()
    return SingleProcess()


@contextlib.contextmanager
def running(strategy: SingleProcess) -> Iterator[SingleProcess]:
    """Tear the process group down however the run ends."""
    try:
        yield strategy
    finally:
        strategy.close()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m lorakit <argv>`."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lorakit", *argv]
