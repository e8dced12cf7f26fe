"""Memory a model needs against memory the device has, checked before anything is allocated.

Building `deepseek-v3` on a laptop used to start allocating 2.7 TB and die in the allocator (or
the OOM killer). `check_fits` compares the bytes a model will take with what the device has free
now and raises a one-line `ConfigError` naming both sizes first.
"""

from __future__ import annotations

import os

import torch

from moeco.errors import ConfigError


def available_bytes(device: str | torch.device) -> int | None:
    """Free memory on `device` now (host RAM for cpu); None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except RuntimeError:
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def check_fits(needed: int, device: str | torch.device, what: str, fix: str) -> None:
    """Raise ConfigError when `needed` bytes exceed the memory free on `device`.

    what: the thing and its size in words ("deepseek-v3's weights (671.0B parameters in float32)").
    """
    free = available_bytes(device)
    if free is not None and needed > free:
        raise ConfigError(f"{what} need {human_bytes(needed)} but {torch.device(device)} has only "
                          f"{human_bytes(free)} free; {fix}")
