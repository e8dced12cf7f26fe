"""Whole-step CUDA graphs: one optimizer step (every micro-step's forward and backward, gradient
clipping, AdamW) recorded once and replayed, so the host no longer launches kernels one by one.

Why: a training step of `small` launches thousands of kernels. In FP8 each Linear adds its own
quantization launches and Python work, and the host falls behind the GPU: on the H200 the FP8
step takes 333 ms eagerly and 250 ms replayed (BF16, already GPU-bound: 248 and 242 ms;
bench/fp8_train_step.py). A replayed graph launches everything in one call.

How (the pattern of torch.cuda.graph's whole-network capture):
    steps 1-2  eager, on a side stream: they are real training steps, and they create the
               optimizer state, the cuBLAS/cuDNN workspaces and Triton's compiled kernels
    step 3     captured into a graph, then replayed: inputs come from a static device buffer,
               gradients live in the graph's memory pool and are never freed (no zero_grad:
               the first micro-step's backward overwrites them, later ones accumulate)
    step 4...  copy the batch into the static buffer, set the learning rate tensor, replay

What must hold inside the step, and does: no host reads (`.item()`, `.tolist()`, bincount,
boolean masks): the MoE path counts with scatter_add and dispatches with gathers; the optimizer is
capturable (device step counts, `lr` a device tensor filled before each replay); autocast's weight
cache is off (a cached cast would outlive the capture); attention avoids SDPA's memory-efficient
backend (see CAPTURE_SDPA_BACKENDS). The warm-up steps run under the same autocast and attention
settings, so that torch.compile (`train.compile`) does not recompile during the capture. Everything
outside the step runs eagerly between replays and sees the same tensors: the balance hook reads the
routers' counts and moves their biases in place, evaluation and checkpoints read the parameters.

Limits: one process (no DDP; its gradient hooks would need their own capture), fixed shapes (the
trainer's batches are), CUDA only, bf16 or fp8 precision (FP32 experts run a per-expert loop sized
on the host); the trainer refuses the others before it writes anything. A step that still cannot be
captured fails with a one-line error that says to turn the option off; the process's CUDA state may
not survive a failed capture, so the run stops there.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moeco.errors import ConfigError

WARMUP_STEPS = 2
# SDPA's memory-efficient backend hands its backward CPU scalars (the dropout RNG seed and offset,
# even without dropout), a host-to-device copy a capture refuses (seen on the H200, torch 2.11, with
# FP32 attention). Graphed steps use the others: cuDNN or flash, as eager BF16 steps do, and the
# math backend where neither applies.
CAPTURE_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: in place when it is a device tensor (a captured step reads it)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Turn an optimizer that has taken a step into one a CUDA graph can capture."""
    prepare = getattr(optimizer, "prepare_capture", None)
    if prepare is not None:  # moeco's AdamWBF16Moments: device step counts
        prepare()
    else:  # torch.optim.AdamW (fused on CUDA keeps its step counts on the device already)
        for group in optimizer.param_groups:
            group["capturable"] = True
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if "step" in st and (not torch.is_tensor(st["step"]) or st["step"].device != p.device):
                    st["step"] = torch.as_tensor(float(st["step"]), dtype=torch.float32, device=p.device)
    for group in optimizer.param_groups:
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def portable_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with plain-number learning rates and capturable off, so that a
    checkpoint written by a graphed run resumes anywhere (the next graphed run re-enables both)."""
    sd = optimizer.state_dict()
    for group in sd["param_groups"]:  # state_dict() packs new dicts per group: the optimizer is untouched
        if torch.is_tensor(group.get("lr")):
            group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
    return sd


class GraphedStep:
    """Runs `compute(batch_ABS, graph_mode) -> outputs` eagerly twice, then as a replayed CUDA graph.

    `compute` does one whole optimizer step on a device batch (A micro-steps, B sequences, S + 1
    tokens) and returns device tensors; `optimizer` is made capturable before the capture. CUDA
    only: the trainer checks the device (and the other limits) before it builds one.
    """

    def __init__(self, compute: Callable[[torch.Tensor, bool], tuple], optimizer: torch.optim.Optimizer,
                 device: torch.device, zero_grad: Callable[[], None]) -> None:
        self.compute, self.optimizer, self.device, self.zero_grad = compute, optimizer, device, zero_grad
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: torch.Tensor | None = None
        self.outputs: tuple | None = None
        self.eager_steps = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, batch_ABS: torch.Tensor) -> tuple:
        if self.graph is None and self.eager_steps < WARMUP_STEPS:
            return self._eager(batch_ABS)
        if self.graph is None:
            self._capture(batch_ABS)
        else:
            self.static_batch.copy_(batch_ABS, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def _eager(self, batch_ABS: torch.Tensor) -> tuple:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        # The same autocast and attention settings as the capture: torch.compile guards on them, and
        # a recompilation while capturing would break the capture.
        with torch.cuda.stream(self.stream), sdpa_kernel(CAPTURE_SDPA_BACKENDS):
            out = self.compute(batch_ABS.to(self.device), True)
            self.zero_grad()
        current.wait_stream(self.stream)
        self.eager_steps += 1
        return out

    def _capture(self, batch_ABS: torch.Tensor) -> None:
        self.static_batch = batch_ABS.to(self.device).clone()
        make_capturable(self.optimizer, self.device)
        self.zero_grad()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph), sdpa_kernel(CAPTURE_SDPA_BACKENDS):
                self.outputs = self.compute(self.static_batch, True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"train.cuda_graph = true, but this training step cannot be captured as a "
                              f"CUDA graph ({first}); set train.cuda_graph = false") from None
        self.graph = graph
