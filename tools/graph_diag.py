"""Debug aid: list the ops of one training step that mix CPU and CUDA tensors (the ones a CUDA graph
capture refuses), with the moeco frame that called them.

    PYTHONPATH=src python tools/graph_diag.py --set 'train.precision="fp32"'
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeco.train.config import TrainConfig
from moeco.train.trainer import Trainer


class MixedDevices(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devs = {a.device.type for a in flat}
        if "cpu" in devs and "cuda" in devs or func.__name__.startswith(("_to_copy", "copy_", "lift_fresh")):
            cpu = [tuple(a.shape) for a in flat if a.device.type == "cpu"]
            if cpu or "cuda" not in devs:
                frames = [f"{f.filename.split('src/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                          if "moeco" in f.filename or "torch/optim" in f.filename or "torch/nn/utils" in f.filename]
                self.seen[(func.__name__, str(cpu), " <- ".join(frames[-3:]))] += 1
        try:
            return func(*args, **kwargs)
        except Exception:
            frames = [f"{f.filename.split('site-packages/')[-1].split('src/')[-1]}:{f.lineno} {f.name}"
                      for f in traceback.extract_stack()][-8:]
            print(f"FAILED in {func.__name__} with devices {[a.device.type for a in flat]} "
                  f"shapes {[tuple(a.shape) for a in flat]}\n  " + "\n  ".join(frames), flush=True)
            raise


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    cfg = TrainConfig().with_overrides(['model.preset="tiny"', "data.seq_len=64", "train.batch_size=4",
                                        "train.steps=50", "log.eval_interval=0", "checkpoint.every=0", *a.set])
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, tmp + "/run", overwrite=True, verbose=False)
        t.train_step()
        mode = MixedDevices()
        batch = torch.stack([t.data.sequences(torch.arange(4))]).cuda()
        from moeco.train.cuda_graph import CAPTURE_SDPA_BACKENDS, make_capturable
        from torch.nn.attention import sdpa_kernel

        with mode:
            t._compute(batch, False)
        torch.cuda.synchronize()
        make_capturable(t.optimizer, t.dist.device)
        t._zero_grad()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), sdpa_kernel(CAPTURE_SDPA_BACKENDS), MixedDevices():
                t._compute(batch, True)
            print("capture OK")
        except Exception as exc:  # noqa: BLE001
            print("capture failed:", str(exc).splitlines()[0])
        for (name, cpu, where), n in mode.seen.most_common():
            print(f"{n:4d} x {name} cpu args {cpu} | {where}")
        t.close()


if __name__ == "__main__":
    main()
