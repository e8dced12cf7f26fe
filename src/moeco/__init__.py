"""moeco: DeepSeek-V3's hardware-aware co-design, usable on the hardware you have.

    >>> import moeco
    >>> cfg = moeco.ModelConfig.preset("tiny")
    >>> model = moeco.Transformer(cfg)
    >>> model.save_pretrained("out/tiny")            # HF layout, loads in transformers too
    >>> model = moeco.load_pretrained("out/tiny")
"""

from moeco.config import ModelConfig
from moeco.errors import ConfigError, DataError, LoadError, MoecoError

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "LoadError", "MoecoError", "ModelConfig", "Transformer",
    "load_pretrained", "__version__",
]


def __getattr__(name: str):
    # Lazy so that `moeco plan` (configs only) starts without building the model modules.
    if name == "Transformer":
        from moeco.model.transformer import Transformer

        return Transformer
    if name == "load_pretrained":
        from moeco.loading import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'moeco' has no attribute {name!r}")
