"""MTP speculative decoding: greedy output unchanged token for token; under sampling the rule keeps
the target distribution."""

import pytest
import torch

import moeco
from helpers import micro_config, sharp_attention
from moeco.serve import LLM, SamplingParams
from moeco.serve.spec import accept_or_resample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(31)
    return sharp_attention(moeco.Transformer(micro_config(max_position_embeddings=96)), seed=31).eval()


def test_speculative_greedy_equals_plain_greedy(model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 25, (10,), generator=g)]
    params = [SamplingParams(max_tokens=int(m), ignore_eos=True) for m in torch.randint(2, 20, (10,), generator=g)]
    opts = dict(model=model, block_size=4, device="cpu", cache_bytes=1 << 20, max_num_batched_tokens=20)
    plain = LLM(**opts).generate(prompts, params)
    spec_llm = LLM(speculative="mtp", **opts)
    spec = spec_llm.generate(prompts, params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    s = spec_llm.engine.stats()
    assert s["spec_acceptance_rate"] is not None and spec_llm.engine.spec.proposed > 50
    assert s["free_blocks"] == s["total_blocks"]


def test_rejection_rule_keeps_the_target_distribution():
    """Draw d ~ q, apply the rule: the tokens follow p (chi-square over 6 outcomes, 20,000 draws)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    q = torch.tensor([0.05, 0.1, 0.4, 0.05, 0.3, 0.1])
    n = 20000
    counts = torch.zeros(6)
    accepted = 0
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        tok, ok = accept_or_resample(p, q, d, g)
        counts[tok] += 1
        accepted += ok
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 20.5  # p = 0.001 for 5 degrees of freedom
    assert abs(accepted / n - float(torch.minimum(p, q).sum())) < 0.02  # acceptance = sum min(p, q)
    # the check has power: returning the draft unconditionally follows q, far from p
    naive = torch.bincount(torch.multinomial(q, n, replacement=True, generator=g), minlength=6).float()
    assert float(((naive - n * p) ** 2 / (n * p)).sum()) > 1000
