"""The process group a harvest runs in: one process, or ``torch.distributed`` (started by
``torchrun``; gloo on CPU, nccl on CUDA).

Under ``torchrun --nproc-per-node N`` (or ``--nnodes M --rdzv-endpoint HOST:PORT`` across
machines, which share the output directory) the environment carries ``RANK`` and
``WORLD_SIZE``; :meth:`Group.current` joins that group if nobody has yet. Each rank then takes a
fixed share of the work, and :meth:`Group.barrier` waits for all of them.

>>> Group.current("cpu").world                   # a plain process: a group of one
1
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Group:
    """``rank`` of ``world`` processes; ``active`` when torch.distributed connects them."""

    rank: int = 0
    world: int = 1
    active: bool = False

    @classmethod
    def current(cls, device: str | torch.device = "cpu") -> Group:
        """The running group: torch.distributed if initialised (or if ``WORLD_SIZE > 1`` in the
        environment, which this joins: gloo for CPU models, nccl for CUDA ones), else one process."""
        import torch.distributed as dist

        if not dist.is_available():
            return cls()
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return cls()
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), True)

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for in one process)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()


__all__ = ["Group"]
