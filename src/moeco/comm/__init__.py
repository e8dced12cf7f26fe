"""What crosses the wire in expert parallelism: codecs (BF16, E4M3/E5M2 1x128, LogFMT-nBit) and a
dispatcher wrapper that applies them inside the single-process model."""

from moeco.comm.codec import BF16Codec, Codec, FP8Codec, LogFMTCodec, get_codec, roundtrip
from moeco.comm.dispatcher import CodecDispatcher, apply_codecs

__all__ = ["BF16Codec", "Codec", "CodecDispatcher", "FP8Codec", "LogFMTCodec", "apply_codecs", "get_codec",
           "roundtrip"]
