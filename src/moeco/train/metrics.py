"""What a training run reports: metrics.jsonl, the console (progress bar and log lines), PNG plots.

`OUT/metrics.jsonl` holds one JSON object per optimizer step:

    step, loss, lm_loss, mtp_loss, balance_loss, lr, grad_norm, tokens (seen so far), step_time_s,
    tokens_per_s, mfu (null when the device's peak is unknown), expert_load: {layer id: max/mean load},
    expert_counts: {layer id: [tokens routed to each expert this step]} (the trace `moeco plan eplb`
    reads) and, at evaluation steps, val_loss and val_ppl.

MFU = tokens/s x FLOPs per token / (ranks x peak FLOP/s), with the planner's FLOPs-per-token
convention (`moeco.plan.costs.train_flops_per_token(..., mtp=True)`: causal attention, the MTP
modules' layer, eh_proj and head included); without the planner, 6 x active matmul parameters.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from moeco.config import ModelConfig

# Dense bf16 peak TFLOP/s of one device, by a substring of its name (for MFU).
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "H800": 989.5, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    try:
        from moeco.plan.costs import train_flops_per_token
    except ImportError:
        return 6.0 * active_matmul_params(config)
    return float(train_flops_per_token(config, seq_len, mtp=True))


def active_matmul_params(c: ModelConfig) -> int:
    """Weights one token multiplies with (head and MTP included, embedding lookup excluded)."""
    H = c.hidden_size
    q = H * c.q_lora_rank + c.q_lora_rank * c.num_attention_heads * c.qk_head_dim if c.q_lora_rank \
        else H * c.num_attention_heads * c.qk_head_dim
    attn = q + H * c.latent_dim + c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) \
        + c.num_attention_heads * c.v_head_dim * H
    moe = H * c.n_routed_experts + (c.n_shared_experts + c.num_experts_per_tok) * 3 * H * c.moe_intermediate_size
    dense = 3 * H * c.intermediate_size
    layers = sum(attn + (moe if c.is_moe_layer(i) else dense) for i in range(c.num_hidden_layers))
    mtp = c.num_nextn_predict_layers * (attn + moe + 2 * H * H + H * c.vocab_size)
    return layers + H * c.vocab_size + mtp


def peak_flops(device_name: str, override_tflops: float) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


class MetricsLog:
    """Appends one JSON line per step; on resume keeps only the lines up to the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        records = read_metrics(self.path) if resume_step is not None else []
        kept = [r for r in records if r.get("step", 0) <= (resume_step or 0)]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return out


def format_line(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    line = (f"step {r['step']:>6}  loss {r['loss']:.4f}  lm {r['lm_loss']:.4f}  mtp {r['mtp_loss']:.4f}  "
            f"bal {r['balance_loss']:.3e}  lr {r['lr']:.2e}  gnorm {r['grad_norm']:.3f}  "
            f"tok/s {r['tokens_per_s']:,.0f}  mfu {mfu}")
    if r.get("expert_load"):
        line += f"  load max/mean {max(r['expert_load'].values()):.2f}"
    if "val_loss" in r:
        line += f"  | val {r['val_loss']:.4f} ppl {r['val_ppl']:.1f}"
    return line


class Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a terminal; plain log lines everywhere."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn

            self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                    console=self.console, transient=True)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()
        self.enabled = enabled

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"],
                            info=f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s")

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def write_plots(records: list[dict], directory: Path) -> list[Path]:
    """loss.png (training and validation losses) and expert_load.png (max/mean load per MoE layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]
    written = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("loss", "total"), ("lm_loss", "LM"), ("mtp_loss", "MTP")):
        ax.plot(steps, [r[key] for r in records], label=label, linewidth=1)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation LM", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "loss.png", dpi=110)
    plt.close(fig)
    written.append(directory / "loss.png")

    layers = sorted({k for r in records for k in r.get("expert_load", {})}, key=int)
    if layers:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for layer in layers:
            pts = [(r["step"], r["expert_load"][layer]) for r in records if layer in r.get("expert_load", {})]
            ax.plot(*zip(*pts), label=f"layer {layer}", linewidth=1)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("max / mean tokens per expert")
        ax.set_title("expert load per MoE layer (1.0 = perfectly balanced)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
        fig.tight_layout()
        fig.savefig(directory / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(directory / "expert_load.png")
    return written


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
