"""`moeco experiment accumulation`: FP8 GEMM error against K, with and without promotion every 128.

DeepSeek-V3 (TR section 3.3): Hopper's FP8 Tensor Cores keep ~14 bits in the accumulator, which for
K = 4096 gives "a maximum relative error of nearly 2%"; copying the partial sums to FP32 every
N_C = 128 of K ("promotion") repairs it.

    A (M, K) E4M3 per 1x128 tile, B (N, K) E4M3 per 128x128 block     (moeco.fp8.quantize)
    ref  = dequant(A) . dequant(B)^T in float64                       (only the accumulation differs)
    out  = emulate_hopper_accumulation(A, B, promotion=None | 128)    (moeco.fp8.gemm: 32 products
           aligned to the largest exponent, 13 fraction bits kept, FP22 running sum)
    error = max |out - ref| / max |ref|                               over the M x N outputs

Operands: "uniform" U[0, 1) (same-sign products, the worst case: the running sum grows),
"normal" N(0, 1) (random signs), and "real": activations entering the MoE layers of a trained moeco
model (A) against its expert up-projection rows (B), each concatenated along K to reach K (real value
distributions; at tiny's hidden size 128 no single row is longer than 128).
"""

from __future__ import annotations

import torch

from moeco.experiments import common

NAME = "accumulation"
KS = (512, 1024, 2048, 4096, 8192, 16384)


def add_args(p) -> None:
    common.add_common_args(p, steps=40)
    common.add_run_arg(p)
    p.add_argument("--k", type=int, nargs="+", default=list(KS), help="inner dimensions K (multiples of 128)")
    p.add_argument("--mn", type=int, default=32, help="M = N, outputs per side (default 32)")
    p.add_argument("--seeds", type=int, default=3, help="draws per point; the table shows the mean (default 3)")
    p.add_argument("--no-real", action="store_true", help="random operands only (no trained model needed)")


def _operands(a, b):
    from moeco.fp8.quantize import (dequantize_act_1x128, dequantize_weight_128x128, quantize_act_1x128,
                                    quantize_weight_128x128)

    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_weight_128x128(b)
    ref = dequantize_act_1x128(aq, sa).double() @ dequantize_weight_128x128(bq, sb).double().t()
    return aq, sa, bq, sb, ref


def _errors(a, b) -> tuple[float, float]:
    from moeco.fp8.gemm import emulate_hopper_accumulation

    aq, sa, bq, sb, ref = _operands(a, b)
    scale = ref.abs().max()
    no_promo = emulate_hopper_accumulation(aq, sa, bq, sb, promotion=None)
    promo = emulate_hopper_accumulation(aq, sa, bq, sb, promotion=128)
    return float((no_promo - ref).abs().max() / scale), float((promo - ref).abs().max() / scale)


@torch.no_grad()
def real_pools(run_dir, n_tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation values entering the MoE layers, expert up-projection weight rows), each (n, 128)."""
    trained = common.load_run(run_dir, max_val=16)
    model = trained.model
    acts = []
    hooks = [moe.register_forward_pre_hook(lambda m, inp: acts.append(inp[0].reshape(-1, inp[0].shape[-1])))
             for _, moe in model.moe_layers()]
    model(trained.val_BS[:max(1, n_tokens // trained.val_BS.shape[1] + 1), :-1])
    for h in hooks:
        h.remove()
    weights = torch.cat([moe.experts.w13_E2FD.detach().reshape(-1, moe.experts.w13_E2FD.shape[-1])
                         for _, moe in model.moe_layers()])
    return torch.cat(acts).float().cpu(), weights.float().cpu()


def _from_pool(pool: torch.Tensor, rows: int, K: int, gen: torch.Generator) -> torch.Tensor:
    need = -(-rows * K // pool.shape[1])
    idx = torch.randint(0, pool.shape[0], (need,), generator=gen)
    return pool[idx].reshape(-1)[:rows * K].reshape(rows, K)


def run(args) -> dict:
    common.check_positive(args, "mn", "seeds")
    bad = [k for k in args.k if k < 128 or k % 128]
    if bad:
        from moeco.errors import ConfigError

        raise ConfigError(f"--k {bad[0]} is invalid: K must be a positive multiple of 128 (e.g. 4096)")
    out = common.out_dir(args, NAME)
    pools = None if args.no_real else real_pools(common.base_run(args, out))
    kinds = ["uniform", "normal"] + ([] if pools is None else ["real"])
    M = args.mn
    results = {kind: {} for kind in kinds}
    for kind in kinds:
        for K in args.k:
            errs = []
            for seed in range(args.seeds):
                gen = torch.Generator().manual_seed(1000 * seed + K)
                if kind == "real":
                    a, b = _from_pool(pools[0], M, K, gen), _from_pool(pools[1], M, K, gen)
                else:
                    draw = torch.rand if kind == "uniform" else torch.randn
                    a, b = draw((M, K), generator=gen), draw((M, K), generator=gen)
                errs.append(_errors(a, b))
            results[kind][K] = {"no_promotion": sum(e[0] for e in errs) / len(errs),
                                "promotion_128": sum(e[1] for e in errs) / len(errs),
                                "no_promotion_max": max(e[0] for e in errs)}
    columns = ["operands", "K", "max rel. error, no promotion (%)", "with promotion every 128 (%)"]
    rows = [[kind, K, 100 * r["no_promotion"], 100 * r["promotion_128"]]
            for kind in kinds for K, r in results[kind].items()]
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for kind, color in zip(kinds, ("C0", "C1", "C2")):
        ks = list(results[kind])
        ax.plot(ks, [100 * results[kind][k]["no_promotion"] for k in ks], "o-", color=color,
                label=f"{kind}, no promotion")
        ax.plot(ks, [100 * results[kind][k]["promotion_128"] for k in ks], "s--", color=color,
                label=f"{kind}, promotion every 128")
    ax.axhline(2.0, color="gray", linestyle=":", label="paper: ~2% at K=4096")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (inner dimension)")
    ax.set_ylabel("max relative error (%)")
    ax.set_title(f"FP8 GEMM accumulation error (emulated 14-bit accumulator, {M}x{M} outputs)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return common.finish(out, NAME, [("FP8 GEMM accumulation error vs K", columns, rows)],
                         {"results": results, "mn": M, "seeds": args.seeds}, fig)
