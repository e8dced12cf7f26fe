"""`moeco experiment balance`: auxiliary-loss-free balancing against an auxiliary loss, at equal compute.

DeepSeek-V3 (TR sections 2.1.2 and 4.5.2-4.5.3): a per-expert bias b, used only to select experts and
moved by gamma after each step against the expert's load, balances as well as an auxiliary loss and
trains better (validation loss 2.253 vs 2.258 at 1B, 2.080 vs 2.085 at 3B, against the sequence-wise
aux loss).

Runs, identical but for the balancing (same data, seed, steps):

    aux-loss-free        gamma = train.bias_update_speed (0.01 here), alpha = 0
    aux loss alpha=A     gamma = 0, model.aux_loss_alpha = A     (sequence-wise L_Bal = A sum_i f_i P_i)
    neither              gamma = 0, alpha = 0

Measured: the final held-out loss, and the expert load as max/mean tokens per expert (1.0 = perfect
balance) per MoE layer and step, averaged over the layers; "late load" is its mean over the last
fifth of the steps. With --seeds N each variant trains N times (seeds SEED..SEED+N-1) and its loss
gap to the aux-loss-free run of the same seed is reported as a mean and spread over the seeds.
"""

from __future__ import annotations

from pathlib import Path

from moeco.experiments import common

NAME = "balance"


def add_args(p) -> None:
    common.add_common_args(p, steps=40)
    common.add_seeds_arg(p)
    p.add_argument("--gamma", type=float, default=0.01,
                   help="bias update speed of the aux-loss-free run (default 0.01)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.001, 0.01],
                   help="sequence-wise aux-loss weights to compare (default 0.001 0.01)")


def _load_curve(records) -> list[tuple[int, float]]:
    curve = []
    for r in records:
        loads = list(r.get("expert_load", {}).values())
        if loads:
            curve.append((r["step"], sum(loads) / len(loads)))
    return curve


def run(args) -> dict:
    common.check_positive(args, "steps", "batch_size", "seq_len", "seeds")
    if args.gamma <= 0 or any(a <= 0 for a in args.alphas):
        from moeco.errors import ConfigError

        raise ConfigError(f"--gamma {args.gamma} / --alphas {args.alphas} are invalid: each must be > 0 "
                          f"(the 'neither' run covers zero)")
    out = common.out_dir(args, NAME)
    variants = [("aux-loss-free", [f"train.bias_update_speed={args.gamma}", "model.aux_loss_alpha=0.0"])]
    variants += [(f"aux loss alpha={a:g}", ["train.bias_update_speed=0.0", f"model.aux_loss_alpha={a}"])
                 for a in args.alphas]
    variants.append(("neither", ["train.bias_update_speed=0.0", "model.aux_loss_alpha=0.0"]))
    results, losses, loads, tok = {}, {label: {} for label, _ in variants}, {label: {} for label, _ in variants}, None
    for sargs in common.seed_args(args):
        for label, sets in variants:
            name = common.run_name(label.replace(" ", "-").replace("=", ""), sargs, args.seed)
            r = common.train_run(sargs, out, name, *sets, tokenizer=tok)
            tok = tok or Path(r["dir"]) / "tokenizer"
            curve = _load_curve(r["records"])
            tail = curve[-max(1, len(curve) // 5):]
            late = sum(v for _, v in tail) / len(tail)
            losses[label][sargs.seed], loads[label][sargs.seed] = r["val_loss"], late
            if sargs.seed == args.seed:
                results[label] = {
                    "val_loss": r["val_loss"],
                    "val_curve": [(x["step"], x["val_loss"]) for x in r["records"] if "val_loss" in x],
                    "load_curve": curve, "late_load": late,
                    "final_balance_loss": r["records"][-1]["balance_loss"], "sets": sets}
    paired = common.paired_gaps(losses, "aux-loss-free")
    for label, r in results.items():
        r.update(paired[label], val_loss_by_seed=losses[label], late_load_by_seed=loads[label],
                 late_load_mean=sum(loads[label].values()) / len(loads[label]))
    if args.seeds == 1:
        columns = ["run", "final held-out loss", "late max/mean load", "final sum f_i P_i"]
        rows = [[label, r["val_loss"], r["late_load"], r["final_balance_loss"]] for label, r in results.items()]
    else:
        columns = ["run", "mean held-out loss", "gap to aux-loss-free % (mean)", "std of gap %", "gap per seed %",
                   "late max/mean load (mean)"]
        rows = [[label, r["mean_val_loss"], r["gap_pct_mean"], r["gap_pct_std"],
                 " ".join(f"{g:+.3f}" for g in r["gap_pct_by_seed"].values()), r["late_load_mean"]]
                for label, r in results.items()]
    fig = _plot(results)
    title = f"Load balancing, {args.preset}, {args.steps} steps of {args.batch_size}x{args.seq_len} tokens"
    if args.seeds > 1:
        title += f", seeds {args.seed}..{args.seed + args.seeds - 1} (load curves: seed {args.seed})"
    return common.finish(out, NAME, [(title, columns, rows)], {"results": results}, fig)


def _plot(results: dict):
    """Held-out loss (curves of the first seed, or each run's paired gap over the seeds) and expert load."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    common.plot_val_loss(ax, results, "aux-loss-free", "validation loss", "val_curve")
    ax = axes[1]
    for label, r in results.items():
        ax.plot(*zip(*r["load_curve"]), label=label, linewidth=1)
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean tokens per expert (mean over layers)")
    ax.set_title("expert load, first seed (1.0 = balanced)")
    ax.legend(fontsize="small")
    for a in axes:
        a.grid(alpha=0.3)
    return fig
