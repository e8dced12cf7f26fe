"""`moeco experiment mtp`: how often the MTP module's draft of the second token is accepted.

DeepSeek-V3 (TR section 5.4.3, ISCA section 2.3.3): used for speculative decoding, the MTP module's
prediction of the second next token is accepted 85-90% of the time (80-90% in ISCA), which makes
generation 1.8x faster in tokens per second.

Offline accept/reject simulation with greedy decoding (the serving engine is not involved):

    generated   from each held-out prefix of P tokens, the model greedily generates G tokens t
    draft_i     = argmax MTP_1(h_i, Emb(t_(i+1)))      the module's guess for t_(i+2)
    accepted_i  = draft_i == t_(i+2)                   t_(i+2) is the main model's own greedy choice,
                                                       exactly what verification would compare with
    acceptance  = mean over the generated positions; per position bucket as well
    teacher-forced: the same comparison on the held-out text itself (draft vs the main model's
                argmax at i+1), without generation
    context     the share of distinct tokens in the generated text (a model that repeats itself
                makes every draft easy) and the main model's top-1 accuracy on the held-out text

Speed-up with one draft token per step: each step yields 1 + a tokens (a = acceptance) for the
cost of the main model plus the MTP module, c = FLOPs of the module / FLOPs of the main model
(matmul parameters active per token: attention, MLA projections, shared and top-K routed experts;
the output head counted on both sides):  speed-up ~ (1 + a) / (1 + c).
"""

from __future__ import annotations

import torch

from moeco.experiments import common

NAME = "mtp"


def add_args(p) -> None:
    common.add_common_args(p, steps=40)
    common.add_run_arg(p)
    p.add_argument("--prompts", type=int, default=16, help="held-out prefixes to continue (default 16)")
    p.add_argument("--prefix", type=int, default=32, help="tokens of each prefix (default 32)")
    p.add_argument("--generate", type=int, default=48, help="tokens generated after each prefix (default 48)")


def _active_params(module: torch.nn.Module, config) -> float:
    """Matmul parameters a token passes through: 2-D weights, routed experts scaled by K/E."""
    total = 0.0
    ratio = config.num_experts_per_tok / config.n_routed_experts
    for name, p in module.named_parameters():
        if p.dim() == 3:  # grouped routed experts
            total += p.numel() * ratio
        elif p.dim() == 2 and "embed_tokens" not in name and not name.endswith("gate.weight"):
            total += p.numel()
    return total


@torch.no_grad()
def greedy_continue(model, prefix_BP: torch.Tensor, n: int) -> torch.Tensor:
    seqs = prefix_BP
    for _ in range(n):
        logits = model(seqs, last_only=True).logits
        seqs = torch.cat([seqs, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seqs


@torch.no_grad()
def acceptance(model, seqs_BS: torch.Tensor, start: int) -> torch.Tensor:
    """accepted (B, S-2-start) bool: the MTP draft at i equals the main model's argmax at i+1, for i >= start."""
    out = model(seqs_BS, return_mtp=True)
    draft = out.mtp_logits[0].argmax(-1)  # (B, S-1): position i guesses token i+2
    main_next = out.logits.argmax(-1)  # (B, S): position i+1 predicts token i+2
    S = seqs_BS.shape[1]
    return draft[:, start:S - 2] == main_next[:, start + 1:S - 1]


def run(args) -> dict:
    common.check_positive(args, "prompts", "prefix", "generate")
    out = common.out_dir(args, NAME)
    trained = common.load_run(common.base_run(args, out), max_val=args.prompts)
    model, cfg = trained.model, trained.model.config
    if not len(model.mtp):
        from moeco.errors import ConfigError

        raise ConfigError(f"the model in {trained.path} has no MTP module (num_nextn_predict_layers = 0); "
                          f"train one with model.num_nextn_predict_layers = 1")
    prefix = trained.val_BS[:, :args.prefix]
    if prefix.shape[1] + args.generate > cfg.max_position_embeddings:
        from moeco.errors import ConfigError

        raise ConfigError(f"--prefix {args.prefix} + --generate {args.generate} exceeds the model's "
                          f"max_position_embeddings {cfg.max_position_embeddings}; generate fewer tokens")
    seqs = greedy_continue(model, prefix, args.generate)
    acc_BG = acceptance(model, seqs, prefix.shape[1] - 1).float()  # drafts for the generated tokens
    tf = acceptance(model, trained.val_BS[:, :-1], 0).float()
    bucket = max(1, acc_BG.shape[1] // 4)
    per_position = [(f"{i}-{min(i + bucket, acc_BG.shape[1]) - 1}", acc_BG[:, i:i + bucket].mean().item())
                    for i in range(0, acc_BG.shape[1], bucket)]
    gen = seqs[:, prefix.shape[1]:]
    distinct = sum(len(set(row)) for row in gen.tolist()) / gen.numel()
    with torch.no_grad():
        logits = model(trained.val_BS[:, :-1]).logits
    top1 = (logits.argmax(-1) == trained.val_BS[:, 1:]).float().mean().item()
    main_cost = _active_params(model.model, cfg) + model.lm_head.weight.numel()
    mtp_cost = _active_params(model.mtp, cfg) + model.lm_head.weight.numel()
    c = mtp_cost / main_cost
    a = acc_BG.mean().item()
    result = {"acceptance_generated": a, "acceptance_teacher_forced": tf.mean().item(),
              "per_position": per_position, "per_prompt": acc_BG.mean(1).tolist(), "mtp_cost_ratio": c,
              "tokens_per_step": 1 + a, "speedup_estimate": (1 + a) / (1 + c),
              "distinct_generated": distinct, "main_top1_held_out": top1, "prompts": prefix.shape[0], "prefix": prefix.shape[1], "generated": args.generate}
    rows = [["generated (greedy)", a, 1 + a, c, (1 + a) / (1 + c)],
            ["teacher-forced (held-out text)", tf.mean().item(), 1 + tf.mean().item(), c,
             (1 + tf.mean().item()) / (1 + c)]]
    rows += [[f"generated, positions {name}", v, None, None, None] for name, v in per_position]
    # A model that repeats itself makes every draft easy: these two say how much text it really predicts.
    rows += [["distinct tokens / generated tokens", distinct, None, None, None],
             ["main model top-1 accuracy on held-out text", top1, None, None, None]]
    plt = common.pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ax[0].bar([n for n, _ in per_position], [100 * v for _, v in per_position])
    ax[0].axhspan(85, 90, color="C1", alpha=0.2, label="paper: 85-90%")
    ax[0].set_xlabel("position in the generated continuation")
    ax[0].set_ylabel("draft accepted (%)")
    ax[0].set_title(f"MTP acceptance, {prefix.shape[0]} prompts x {args.generate} tokens")
    ax[0].legend(fontsize="small")
    ax[1].hist([100 * v for v in result["per_prompt"]], bins=10)
    ax[1].set_xlabel("acceptance per prompt (%)")
    ax[1].set_ylabel("prompts")
    ax[1].set_title("spread over prompts")
    for x in ax:
        x.grid(alpha=0.3)
    title = f"MTP draft acceptance, model {trained.path}"
    return common.finish(out, NAME, [(title, ["measure", "acceptance", "tokens/step", "MTP cost c",
                                              "speed-up (1+a)/(1+c)"], rows)], result, fig)
