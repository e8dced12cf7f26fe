"""Expert-parallel serving on CPU: the offline engine on one process against EP over gloo ranks.

    PYTHONPATH=src python bench/serve_ep.py                      # 1 process, then EP 2 (2 nodes x 1)
    PYTHONPATH=src python bench/serve_ep.py --ep 2 4 --overlap --requests 32 --json out.json

One random fp32 model (D = --dim, 3 layers, 1 dense, 16 experts top-4), --requests prompts of
--prompt-len random tokens, --max-tokens greedy tokens each (EOS ignored). The single-process run
serves all of them with 1 thread; EP P runs P ranks of 1 thread each (P nodes x 1, direct
dispatcher), rank r serving requests r, r+P, ...; every run checks its tokens against the
single-process ones. After a short warm-up: wall time, engine steps (max over ranks), mean step
time, output tokens/s over all ranks. On a shared CPU host the ranks' gloo all-to-alls are memory
copies on the same cores, so these figures say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def _model(args):
    from moeco import ModelConfig, Transformer

    d = args.dim
    config = ModelConfig(vocab_size=512, hidden_size=d, intermediate_size=2 * d, moe_intermediate_size=d // 2,
                         num_hidden_layers=3, num_attention_heads=4, q_lora_rank=d // 2, kv_lora_rank=d // 4,
                         qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                         n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4,
                         topk_group=2, max_position_embeddings=1024, initializer_range=0.05,
                         num_nextn_predict_layers=0)
    torch.manual_seed(0)
    return Transformer(config)


def _serve(args, ep, overlap, rank=0):
    """(tokens of this rank's requests, steps, wall seconds)."""
    from moeco.serve import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 512, (args.requests, args.prompt_len), generator=g).tolist()
    options = dict(device="cpu", dtype="float32", block_size=16, max_num_seqs=args.requests,
                   max_num_batched_tokens=1024, cache_bytes=1 << 28)
    if ep > 1:
        options.update(ep=ep, gpus_per_node=1, dispatcher="direct", overlap=overlap)
    llm = LLM(args.path, **options)
    llm.generate(prompts[rank::ep][:2], SamplingParams(max_tokens=2))  # warm-up
    steps, step = [0], llm.engine.step

    def counted():
        steps[0] += 1
        return step()
    llm.engine.step = counted
    mine = prompts[rank::ep]
    t0 = time.perf_counter()
    outs = llm.generate(mine, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    return [o.token_ids for o in outs], steps[0], time.perf_counter() - t0


def _worker(rank, world, port, args, overlap, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    torch.save(_serve(args, world, overlap, rank), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, nargs="+", default=[2])
    p.add_argument("--overlap", action="store_true", help="also run each EP size with two_microbatch")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        args.path = f"{tmp}/model"
        _model(args).save_pretrained(args.path)
        ref, steps, wall = _serve(args, 1, "none")
        rows = [("1 process", 1, "none", steps, wall, True)]
        for ep in args.ep:
            for overlap in ("none", "two_microbatch") if args.overlap else ("none",):
                res = _spawn(args, ep, overlap, tmp)
                got = {}
                for r, (tokens, _, _) in enumerate(res):
                    got.update(zip(range(r, args.requests, ep), tokens))
                same = [got[i] for i in range(args.requests)] == ref
                rows.append((f"EP {ep}", ep, overlap, max(s for _, s, _ in res), max(w for _, _, w in res), same))
    total = args.requests * args.max_tokens
    print(f"{args.requests} requests x ({args.prompt_len} prompt + {args.max_tokens} output) tokens, D = {args.dim}, "
          "fp32, 1 thread a process")
    print(f"{'run':<10} {'overlap':<15} {'steps':>6} {'wall s':>8} {'ms/step':>8} {'out tok/s':>10} {'= 1 proc':>9}")
    for name, _, overlap, steps, wall, same in rows:
        print(f"{name:<10} {overlap:<15} {steps:>6} {wall:>8.2f} {1e3 * wall / steps:>8.1f} {total / wall:>10.1f} "
              f"{str(same):>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("run", "ep", "overlap", "steps", "wall_s", "equal"), r)) for r in rows], f, indent=1)


def _spawn(args, ep, overlap, tmp):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"{tmp}/ep{ep}-{overlap}"
    os.makedirs(out)
    mp.spawn(_worker, args=(ep, port, args, overlap, out), nprocs=ep)
    return [torch.load(f"{out}/rank{r}.pt") for r in range(ep)]


if __name__ == "__main__":
    main()
