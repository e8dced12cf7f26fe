"""Whether Triton can run here, for every module with Triton kernels (fp8/, model/, train/).

Triton is optional: every caller keeps a PyTorch path. On a machine without a GPU, Triton runs
kernels only under its interpreter, which Triton itself switches on from TRITON_INTERPRET=1 when
the kernels are defined (at import); `interpreting()` reports the same switch, read once here.
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is absent
    HAVE_TRITON = False

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Triton's kernels run under its interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return _INTERPRETING


def available(device: torch.device | str | None = None) -> bool:
    """Triton can run here: on CUDA tensors, or on CPU tensors under the interpreter."""
    if not HAVE_TRITON:
        return False
    if device is not None and torch.device(device).type == "cpu":
        return interpreting()
    return True


__all__ = ["HAVE_TRITON", "available", "interpreting"]
