"""Data-parallel training with PyTorch's own engine: ``torchrun`` (``torch.distributed.run``) starts the processes,
``DistributedDataParallel`` averages the gradients (gloo on the CPU, NCCL on CUDA), and only rank 0 writes.

How the data are split: every rank draws the *same* global batch from the run's shared generator (batch order, label
dropout, noise and timesteps), then keeps its strided share (rank r takes samples r, r + N, ...), the split a
``DistributedSampler`` makes of an epoch, applied to each global batch. Each rank's loss is scaled so that the
averaged gradient is the gradient of the whole batch's mean loss. So N processes train the same recipe as one
process — same global batch size, learning rate and random numbers — and end with identical weights on every rank
(checked at the end of training); they differ from a one-process run only by floating-point summation order.
One process (``processes: 1``, the default) runs exactly the single-process code, with no process group.

A stage with a ``processes`` key restarts itself under ``torch.distributed.run --standalone`` when the key is above 1
(:func:`relaunch`); a user may also start it with ``torchrun --nproc_per_node=N`` directly, and the key must agree.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from pipeline.core.cli import PipelineError
from pipeline.core.runtime import pick_device

__all__ = ["Ranks", "SINGLE", "state_hash", "under_torchrun", "relaunch", "start", "stop", "train_on"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (``world`` 1: no process group)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process writes outputs, checkpoints and progress (rank 0)."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's strided share of a global batch of ``n`` samples."""
        return slice(self.rank, n, self.world)

    def loss_scale(self, n: int) -> float:
        """Factor on this rank's mean loss over its share of ``n`` samples such that the gradient averaged by DDP is
        that of the global mean (shares differ by one sample when ``world`` does not divide ``n``)."""
        return len(range(n)[self.share(n)]) * self.world / n

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in ``DistributedDataParallel`` (its parameters stay the module's), or itself for one process."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a (detached) tensor over the ranks; itself for one process."""
        if self.world == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world

    def sum(self, value: float) -> float:
        """The sum of a number over the ranks; itself for one process."""
        if self.world == 1:
            return value
        out = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(out)
        return float(out.item())

    def weight_hashes(self, module: torch.nn.Module) -> list[str]:
        """:func:`state_hash` of ``module``'s state on every rank, in rank order."""
        mine = state_hash(module.state_dict())
        if self.world == 1:
            return [mine]
        hashes: list[str] = [""] * self.world
        dist.all_gather_object(hashes, mine)
        return hashes

    def settings(self) -> dict[str, int]:
        """What the processes add to a run's checkpoint key: nothing for one process (its key stays what it always
        was), else their number (N processes sum in another order than one: a checkpoint resumes only the same N)."""
        return {} if self.world == 1 else {"processes": self.world}

    def provenance(self, module: torch.nn.Module) -> dict[str, Any]:
        """What a model folder records of the processes that trained ``module``: nothing for one process (it writes
        what it always did), else their number and weight hashes, checked equal (:meth:`check_identical`; every
        rank must call it)."""
        return {} if self.world == 1 else {"processes": self.world, "rank_weight_hashes": self.check_identical(module)}

    def check_identical(self, module: torch.nn.Module) -> list[str]:
        """The :meth:`weight_hashes`; raises when the ranks' weights differ (a bug: they must stay in step)."""
        hashes = self.weight_hashes(module)
        if len(set(hashes)) != 1:
            raise PipelineError(f"the {self.world} training processes ended with different weights ({hashes})")
        return hashes


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) of a state dict's names and tensor bytes, in name order (a saved
    ``model.safetensors`` hashes as the module it was saved from)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


SINGLE = Ranks()
"""One process, no process group: the default of every training loop."""


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (it sets ``LOCAL_RANK`` and ``WORLD_SIZE``)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(processes: int, module: str, argv: list[str]) -> int | None:
    """Run ``python -m module argv`` again under ``torch.distributed.run`` with ``processes`` processes on this
    machine, when ``processes`` > 1 and this process is not already one of them; return its exit status (None: go
    on in this process). The children die with this process (they run in its process group)."""
    if processes <= 1 or under_torchrun():
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", module, *argv]
    return subprocess.call(cmd)


def start(processes: int, key: str, device: torch.device) -> Ranks:
    """Join the process group that ``torchrun`` set up (gloo on the CPU, NCCL on CUDA) and return this rank; one
    process returns :data:`SINGLE` on ``device``. On the CPU each rank gets ``cpu_count // local processes``
    threads.

    Args:
        processes: the stage's ``processes`` key; it must equal torchrun's ``WORLD_SIZE``.
        key: the params key, for the error message (say ``"train_ldm.processes"``).
        device: the device of a one-process run.

    Raises:
        PipelineError: ``processes`` > 1 outside torchrun, or torchrun started another number of processes.
    """
    if not under_torchrun():
        if processes != 1:
            raise PipelineError(f"{key} is {processes}: start the stage under torchrun --nproc_per_node={processes} "
                                "(the stage does it itself when run through its `python -m` command)")
        return Ranks(device=device)
    world, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if world != processes:
        raise PipelineError(f"torchrun started {world} processes but params key {key} is {processes}; set "
                            f"{key}: {world} (it is the key DVC tracks) or start {processes}")
    if world == 1:
        return Ranks(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(rank=rank, world=world, device=device)


def stop(ranks: Ranks) -> None:
    """Wait for every rank, then leave the process group (no-op for one process)."""
    if ranks.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_on(processes: int, module: str, key: str, train: Callable[[Ranks], None]) -> None:
    """What a training stage's command does: with ``processes`` > 1 outside torchrun, run the command again on that
    many processes (:func:`relaunch`) and wait; else join the processes (:func:`start`), run ``train`` with this rank
    and leave the group (:func:`stop`), also on error.

    Raises:
        PipelineError: the relaunched processes failed, or :func:`start`'s errors.
    """
    code = relaunch(processes, module, sys.argv[1:])
    if code is not None:
        if code:
            raise PipelineError(f"the {processes} training processes failed (exit status {code}); see above")
        return
    ranks = start(processes, key, pick_device())
    try:
        train(ranks)
    finally:
        stop(ranks)
