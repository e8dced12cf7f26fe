"""What crosses the wire in expert parallelism: codecs (BF16, E4M3/E5M2 1x128, LogFMT-nBit) and a
dispatcher wrapper that applies them inside the single-process model.

    codec.py       the Codec interface, the four codecs, get_codec(name), roundtrip (straight-through)
    logfmt.py      LogFMT-nBit: definition and plain PyTorch reference; logfmt_triton.py: its kernels
    dispatcher.py  CodecDispatcher (around any MoE dispatcher) and apply_codecs(model, ...)
    names.py       codec names, checked without torch

Attributes load on first use, so that `moeco.comm.names` (the training config's check) stays free of torch.
"""

import importlib

_EXPORTS = {"BF16Codec": "codec", "Codec": "codec", "FP8Codec": "codec", "LogFMTCodec": "codec",
            "get_codec": "codec", "roundtrip": "codec", "CodecDispatcher": "dispatcher",
            "apply_codecs": "dispatcher"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"moeco.comm.{_EXPORTS[name]}"), name)
    if name in ("codec", "dispatcher", "logfmt", "logfmt_triton", "names"):
        return importlib.import_module(f"moeco.comm.{name}")
    raise AttributeError(f"module 'moeco.comm' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
