"""Data-parallel server training under ``torchrun`` (DDP), matching one process.

``edgetl pretrain`` and ``edgetl distill`` run unchanged under ``torchrun --nproc-per-node N``:
:func:`session` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), joins
the process group (gloo on CPU, nccl where CUDA exists) and leaves it with a barrier; the
training loop (:func:`edgetl.train._fit`) asks :func:`current` and, with more than one process,
trains through :func:`data_parallel`.

What makes N processes reproduce one process up to float rounding, for a fixed seed and global
batch (``TrainConfig.batch_size``):

* every rank draws the same seeded epoch permutation and the same augmentation noise for the
  whole global batch, then keeps its rows ``rank::world`` (the partition
  ``torch.utils.data.DistributedSampler`` uses, without its padding, which would repeat
  samples and change the result); a per-rank batch is ``global batch / world`` rows;
* each rank's mean loss is weighted ``n_rank * world / n_global``, so DDP's gradient average
  equals the gradient of the global batch's mean loss, uneven last batches included;
* batch norm normalises with the statistics of the *global* batch (:class:`GlobalBatchNorm`:
  torch's ``SyncBatchNorm`` refuses CPU tensors), with a differentiable all-reduce;
* dropout draws its mask for the global batch from the (identically seeded) global generator
  and keeps the rank's rows (:class:`GlobalBatchDropout`), as one process draws it.

Only rank 0 writes checkpoints, shows progress bars and scores the validation split.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass

from edgetl.errors import ConfigError

ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: ``rank`` of ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True with more than one process (a process group is in use)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def device(self):
        """``cuda:LOCAL_RANK`` under nccl, else the CPU."""
        import torch

        return torch.device(f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu")


def env_info(environ=None) -> DistInfo:
    """The process's place in a torchrun job, from its environment (no torchrun: rank 0 of 1).

    Raises:
        ConfigError: the variables are partly set, not integers, or out of range.
    """
    env = os.environ if environ is None else environ
    present = [v for v in ENV_VARS if v in env]
    if not present:
        return DistInfo()
    if len(present) != len(ENV_VARS):
        raise ConfigError(f"torchrun sets {', '.join(ENV_VARS)}; found only {present}. Launch "
                          "with `torchrun --nproc-per-node N -m edgetl pretrain ...`, or unset "
                          "them for one process")
    try:
        world, rank, local = (int(env[v]) for v in ENV_VARS)
    except ValueError:
        raise ConfigError(f"{'/'.join(ENV_VARS)} must be integers, got "
                          f"{[env[v] for v in ENV_VARS]}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got RANK={rank}"
                          f" WORLD_SIZE={world} LOCAL_RANK={local}")
    return DistInfo(rank, world, local)


def current() -> DistInfo:
    """The calling process's :class:`DistInfo` inside :func:`session` (rank 0 of 1 outside)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, str(backend))


@contextmanager
def session():
    """Join torchrun's process group for the body (a no-op for one process).

    gloo on CPU, nccl with one GPU per local rank. Torch threads are split between the
    processes of a machine (``torchrun`` defaults ``OMP_NUM_THREADS`` to 1, ``edgetl`` sets its
    own thread count). Ends with a barrier, so no rank leaves before rank 0 has written.
    """
    info = env_info()
    if not info.enabled:
        yield info
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
    try:
        yield current()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def is_main() -> bool:
    """True unless this is a non-zero rank of a process group."""
    return current().is_main


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum ``values`` over the ranks (returned unchanged for one process)."""
    if not info.enabled:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.cpu().tolist()


class GlobalBatch:
    """The global batch being trained on, and this rank's rows of it."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.n_global = 0

    def rows(self, n_global: int) -> slice:
        """Select this rank's rows of a global batch of ``n_global`` rows."""
        self.n_global = n_global
        return slice(self.info.rank, None, self.info.world_size)

    def weight(self, n_rank: int) -> float:
        """Loss factor: DDP's mean of the weighted rank losses = the global batch's mean."""
        return n_rank * self.info.world_size / self.n_global


@functools.cache
def _modules():
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    class _AllReduceSum(torch.autograd.Function):
        """Sum over ranks; its gradient is the sum of the ranks' gradients (total loss)."""

        @staticmethod
        def forward(ctx, t):
            t = t.clone()
            dist.all_reduce(t)
            return t

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            dist.all_reduce(g)
            return g

    all_reduce = _AllReduceSum.apply

    class GlobalBatchNorm(nn.Module):
        """Batch norm over the global batch (all ranks), sharing the wrapped BN's tensors.

        Two differentiable all-reduces per call (mean, then centred sum of squares), so
        gradients flow through the global statistics as in one process; eval mode uses the
        running statistics (no communication). Running variance is unbiased, as torch's.
        """

        def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
            super().__init__()
            self.bn = bn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bn = self.bn
            if not self.training:
                return bn(x)
            dims = [0, *range(2, x.dim())]
            n_local = x.numel() // max(1, x.shape[1])
            count = all_reduce(torch.tensor([float(n_local)], device=x.device))
            mean = all_reduce(x.sum(dims)) / count
            shape = [1, -1] + [1] * (x.dim() - 2)
            var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / count
            if bn.track_running_stats:
                with torch.no_grad():
                    bn.num_batches_tracked.add_(1)
                    m = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                         else bn.momentum)
                    n = float(count)
                    bn.running_mean.mul_(1 - m).add_(m * mean.detach())
                    bn.running_var.mul_(1 - m).add_(m * var.detach() * n / max(n - 1, 1.0))
            y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
            if bn.affine:
                y = y * bn.weight.view(shape) + bn.bias.view(shape)
            return y

    class GlobalBatchDropout(nn.Module):
        """Dropout whose mask is drawn for the global batch, then sliced to this rank's rows."""

        def __init__(self, drop: nn.Dropout, batch: GlobalBatch):
            super().__init__()
            self.p, self.batch = drop.p, batch

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.p == 0:
                return x
            if self.p == 1:
                return x * 0
            shape = (self.batch.n_global, *x.shape[1:])
            # The same draw as F.dropout on the whole batch in one process (CPU generator).
            noise = torch.empty(shape).bernoulli_(1 - self.p).div_(1 - self.p)
            return x * noise[self.batch.rows(self.batch.n_global)].to(x.device)

    return nn, F, GlobalBatchNorm, GlobalBatchDropout


@contextmanager
def data_parallel(model, info: DistInfo):
    """``(net, batch)``: ``model`` itself for one process, else a DDP wrapper of it.

    With several processes, ``model``'s batch-norm and dropout layers are swapped in place
    for global-batch versions for the body (they share the original tensors, so ``model``
    holds the trained weights afterwards) and put back on exit; on CUDA the model visits the
    rank's GPU for the body and comes back to the CPU.
    """
    batch = GlobalBatch(info)
    if not info.enabled:
        yield model, batch
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    nn, _, GlobalBatchNorm, GlobalBatchDropout = _modules()
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                new = GlobalBatchNorm(child)
            elif isinstance(child, nn.Dropout):
                new = GlobalBatchDropout(child, batch)
            else:
                continue
            swapped.append((parent, name, child))
            setattr(parent, name, new)
    model.to(info.device)
    try:
        ids = [info.local_rank] if info.device.type == "cuda" else None
        yield DDP(model, device_ids=ids), batch
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
        model.to("cpu")


def check_batch(batch_size: int, info: DistInfo) -> None:
    """Refuse a global batch that leaves a rank without rows in every step."""
    if info.enabled and batch_size < info.world_size:
        raise ConfigError(f"the global batch ({batch_size}) must be at least the number of "
                          f"processes ({info.world_size}); raise batch_size in the recipe or "
                          "launch fewer processes")


def compare_checkpoints(a, b) -> dict:
    """Max |Δ| over every weight and buffer of two checkpoints, and their held-out accuracy.

    ``python -m edgetl.distributed A.pt B.pt`` prints it (the README's torchrun vs one
    process numbers).
    """
    import torch

    from edgetl.errors import EdgetlError

    one, two = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    sa, sb = one["state_dict"], two["state_dict"]
    if sa.keys() != sb.keys():
        raise EdgetlError(f"{a} and {b} hold different networks; compare checkpoints of the "
                          "same recipe stage")
    diff = {k: float((sa[k].double() - sb[k].double()).abs().max()) for k in sa}
    worst = max(diff, key=diff.get)
    return {"max_abs_diff": diff[worst], "worst_tensor": worst,
            "heldout_accuracy": [one["meta"].get("heldout_accuracy"),
                                 two["meta"].get("heldout_accuracy")]}


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(compare_checkpoints(*sys.argv[1:3]), indent=2))
