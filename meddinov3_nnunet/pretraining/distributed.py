"""The distributed context of a run: rank, world size and device from torchrun's environment, and the few
collectives the loop needs (barrier, sum, gather, and `DistContext.run_on_main` for long work on rank 0)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from meddinov3_nnunet.errors import UserError

from .config import ConfigError

T = TypeVar("T")
# how long the other ranks wait for rank 0's work in `run_on_main` (indexing millions of slices, a probe, a save)
MAIN_WORK_TIMEOUT = timedelta(hours=24)


class MainRankError(UserError):
    """Raised on the other ranks when rank 0's work in `run_on_main` failed (with rank 0's exit code)."""


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    _wait_group: object = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None = None) -> "DistContext":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a single process when they are absent."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        torch_device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(torch_device)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return cls(rank, world_size, local_rank, torch_device)

    def run_on_main(self, work: Callable[[], T], what: str) -> T | None:
        """``work()`` on rank 0 while the other ranks wait for it, however long it takes; returns its result on
        rank 0 (None elsewhere), and a failure on rank 0 stops every rank.

        Not a barrier of the default group: its collectives time out (NCCL after 10 minutes, its watchdog then
        aborts the job) and rank 0's work here can take longer (indexing millions of slices, a probe, writing a
        checkpoint to slow storage). The others wait in a broadcast on a gloo group made with
        ``MAIN_WORK_TIMEOUT`` (24 h): gloo waits on the CPU, and no NCCL operation is pending meanwhile, so
        NCCL's watchdog has nothing to time out. Rank 0 broadcasts its outcome, so an error there (an empty
        corpus) reaches the others as `MainRankError` instead of leaving them waiting. Polling the filesystem for
        a file rank 0 writes was the alternative; it cannot tell a stale file from a fresh one nor carry a
        failure."""
        if self.world_size == 1:
            return work()
        if self._wait_group is None:  # every rank reaches its first run_on_main at the same point
            self._wait_group = dist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT)
        outcome, result = [None], None
        if self.is_main:
            try:
                result = work()
            except BaseException as err:
                outcome = [(type(err).__name__, str(err), getattr(err, "exit_code", None))]
                dist.broadcast_object_list(outcome, src=0, group=self._wait_group)
                raise
        dist.broadcast_object_list(outcome, src=0, group=self._wait_group)
        if outcome[0] is not None:
            name, message, exit_code = outcome[0]
            text = f"rank 0 failed while {what} ({name}: {message})"
            if exit_code is None:
                raise RuntimeError(text)
            error = MainRankError(text)
            error.exit_code = exit_code
            raise error
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """After a run every rank finished: waits for the others, then destroys the process groups, so that no rank
        exits while another still talks to it (gloo's threads then abort the process: "terminate called without an
        active exception")."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self._wait_group = None

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (on this rank's device; a NaN on any rank makes its entry NaN)."""
        if self.world_size > 1:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (a one-element list on a single process)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
