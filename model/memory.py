"""Memory: how much a device has free, byte counts for people, and the error a run that would not
fit raises. The floor every estimate (caches, harvests, graphs, patching) is built on."""

from __future__ import annotations

import torch


class CacheTooLargeError(MemoryError):
    """A requested cache would not fit; the message has the estimate and options that fit."""


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps it at least 1 (B, KiB, MiB, GiB, TiB).

    >>> format_bytes(320), format_bytes(3 * 2**20), format_bytes(0.5)
    ('320 B', '3.0 MiB', '0 B')
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free on ``device`` (None when unknown): CUDA free memory, else Linux MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


__all__ = ["CacheTooLargeError", "format_bytes", "available_memory"]
