import os

# Tests never reach a hub: transformers loads local directories only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Triton on a machine without a GPU runs kernels only under its interpreter, and the switch is read
# when triton is first imported. Importing moeco.fp8 imports torch._dynamo (torch.compiler.disable),
# which imports triton, so set it here, before any test module imports anything.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
