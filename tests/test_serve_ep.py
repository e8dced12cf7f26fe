"""Expert-parallel serving on 2 and 4 gloo processes against the single-process engine (fp32, greedy).

Each rank serves its own subset of 16 mixed-length prompts (one rank none) with only its experts
loaded from the checkpoint; together they must return, token for token, what one engine returns for
all 16. The model has sharp attention and experts whose output dominates the residual stream, so a
wrong expert, slot or row changes the tokens (checked: zeroing one expert does).
"""

import os
import signal

import pytest
import torch

import moeco
from ep_workers import ep_serve
from helpers import micro_config, sharp_attention
from moeco.serve import LLM, SamplingParams
from parallel_helpers import run_ranks

MAX_TOKENS = 8
OPTS = dict(block_size=4, max_num_seqs=8, max_num_batched_tokens=48, cache_bytes=1 << 22, device="cpu",
            dtype="float32")


def _model():
    torch.manual_seed(7)
    model = sharp_attention(moeco.Transformer(micro_config(max_position_embeddings=96)), seed=7)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # decisive routing, experts that matter
        for _, moe in model.moe_layers():
            moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g) * 0.3)
            for w in (moe.experts.w13_E2FD, moe.experts.w2_EDF):
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return model.eval()


def _prompts():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 41, (16,), generator=g).tolist()
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(checkpoint directory, prompts, the single-process engine's tokens for each)."""
    path = tmp_path_factory.mktemp("ep_serve") / "model"
    model = _model()
    model.save_pretrained(path)
    prompts = _prompts()
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    reference = [c.token_ids for c in LLM(str(path), **OPTS).generate(prompts, params)]
    with torch.no_grad():  # the experts matter: expert 5 (on another rank than 0 under EP 2 and 4) off
        next(model.moe_layers())[1].experts.w2_EDF[5].zero_()
    assert [c.token_ids for c in LLM(model=model, **OPTS).generate(prompts, params)] != reference
    return str(path), prompts, reference


def _serve(tmp_path, served, split, ep, gpus_per_node, **options):
    path, prompts, reference = served
    per_rank = [[prompts[i] for i in ids] for ids in split]
    res = run_ranks(ep_serve, ep, path, per_rank, dict(OPTS, ep=ep, gpus_per_node=gpus_per_node, **options),
                    MAX_TOKENS, out_dir=tmp_path, timeout_s=60)
    got = {}
    for ids, r in zip(split, res):
        got.update(zip(ids, r["tokens"]))
    assert [got[i] for i in range(len(prompts))] == reference
    assert len({r["steps"] for r in res}) == 1  # lock-step: every rank stepped until none had work
    L = micro_config().n_routed_experts // ep
    assert [(r["first_expert"], r["num_experts"]) for r in res] == [(e * L, L) for e in range(ep)]
    return res


def test_ep2_serving_equals_single_process(tmp_path, served):
    """2 nodes x 1, direct all-to-all, requests dealt i mod 2."""
    _serve(tmp_path, served, [list(range(0, 16, 2)), list(range(1, 16, 2))], 2, 1, dispatcher="direct")


def test_ep4_serving_with_an_idle_rank_equals_single_process(tmp_path, served):
    """2 nodes x 2, two-hop dispatch, uneven shares and rank 3 with no requests at all."""
    _serve(tmp_path, served, [list(range(0, 7)), list(range(7, 12)), list(range(12, 16)), []], 4, 2)


def test_ep4_serving_two_microbatch_overlap_equals_single_process(tmp_path, served):
    """The same with every forward (prefill and decode) as two micro-batches; rank 1 serves one request."""
    _serve(tmp_path, served, [list(range(0, 8)), [8], list(range(9, 16)), []], 4, 2, overlap="two_microbatch")


def test_overlap_on_the_paged_cache_equals_the_plain_engine(served):
    """One process: the two-micro-batch schedule over the paged cache gives the plain engine's tokens."""
    path, prompts, reference = served
    llm = LLM(path, overlap="two_microbatch", **OPTS)
    assert [c.token_ids for c in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))] \
        == reference
    assert llm.engine.model.schedule.last is not None  # the schedule ran


def test_ep_serving_refuses_speculation_and_bad_sizes(served):
    from moeco.errors import ConfigError

    path = served[0]
    with pytest.raises(ConfigError, match="speculative = 'mtp' is not supported with ep = 2"):
        LLM(path, ep=2, speculative="mtp", **OPTS)
    with pytest.raises(ConfigError, match="must be a positive divisor of the 1 ranks"):
        LLM(path, ep=2, **OPTS)  # one process, no torchrun
    with pytest.raises(ConfigError, match="ep = 0"):
        LLM(path, ep=0, **OPTS)


def test_serve_ep_cli_errors(served, capsys):
    from moeco.cli import main

    path = served[0]
    assert main(["serve", path, "--ep", "2"]) == 2  # not under torchrun
    assert "--ep 2 needs torchrun with 2 ranks (there are 1): torchrun --nproc-per-node 2" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLD_SIZE", "2")
        assert main(["serve", path, "--ep", "2", "--speculative", "mtp"]) == 2
    assert "does not combine with --disaggregate, --role or --speculative" in capsys.readouterr().err


@pytest.mark.slow  # 9-12 s on 2 shared cores: torchrun, 2 ranks and the server start
def test_http_front_door_on_2_ranks_equals_the_offline_engine(tmp_path):
    """`torchrun --nproc-per-node 2 -m moeco serve --ep 2`: 16 concurrent completions (token-id prompts,
    greedy) spread over both ranks give the offline engine's texts; SIGTERM to rank 0 stops every rank with 0."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serve_http_helpers import MODEL_NAME, ServerProcess, build_checkpoint

    model_dir = build_checkpoint(tmp_path / "model", max_position_embeddings=128)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in torch.randint(3, 41, (16,), generator=g)]
    want = LLM(str(model_dir), device="cpu", cache_bytes=8 << 20).generate(
        prompts, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    srv = ServerProcess(model_dir, "--ep", "2", "--gpus-per-node", "1", "--device", "cpu",
                        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    try:
        def complete(p):
            body = {"model": MODEL_NAME, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            return httpx.post(srv.base_url + "/v1/completions", json=body, timeout=120).json()

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(complete, prompts))
        assert [r["choices"][0]["text"] for r in got] == [w.text for w in want]
        metrics = httpx.get(srv.base_url + "/metrics", timeout=10).text
        assert "moeco:num_requests_running" in metrics
        os.kill(_rank0_pid(srv.proc.pid), signal.SIGTERM)  # rank 0 drains, then releases rank 1
        code, output = srv.proc.wait(60), srv.output()
    finally:
        srv.stop()
    assert code == 0 and "Traceback" not in output, output


def _rank0_pid(launcher_pid: int) -> int:
    """The torchrun worker with RANK=0 (Linux /proc)."""
    for child in open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split():
        if b"RANK=0" in open(f"/proc/{child}/environ", "rb").read().split(b"\0"):
            return int(child)
    raise AssertionError("no rank-0 worker under torchrun")


@pytest.mark.slow  # ~10 s on 2 shared cores: torchrun and 2 ranks
def test_generate_cli_on_2_ranks_equals_one_process(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m moeco generate MODEL --ep 2`: rank 0 prints the single process's
    greedy continuation, the other rank prints nothing, and both exit 0 (leaving the group together)."""
    import subprocess
    import sys

    from moeco.cli import main
    from serve_http_helpers import build_checkpoint

    model_dir = str(build_checkpoint(tmp_path / "model", max_position_embeddings=128))
    opts = ["--prompt-ids", "5,17,99,230,41,8,77", "--max-new-tokens", "12", "--dtype", "float32"]
    assert main(["generate", model_dir, *opts]) == 0
    want = capsys.readouterr().out.split("\n[")[0]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "moeco", "generate", model_dir, *opts, "--ep", "2", "--gpus-per-node", "1"],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.split("\n[")[0] == want and proc.stdout.count("tokens/s") == 1
