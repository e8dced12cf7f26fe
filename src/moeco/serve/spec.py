"""MTP speculative decoding: the model's own MTP module drafts the next token, one forward verifies it.

Notation: a sequence has n tokens in the cache (positions 0..n-1), its last sampled token t_n not
yet, and a draft d for position n+1. MTP module k=1 at position i reads h_i (the main model's final
hidden state there) and the embedding of t_{i+1}, and predicts t_{i+2}.

    verify   main forward over [t_n, d] at positions [n, n+1]  ->  logits for n+1 and n+2
    accept   greedy: x = argmax p_{n+1}; keep d iff x == d, then also x' = argmax p_{n+2}
             sampling: keep d with probability min(1, p(d) / q(d)), q the draft's distribution;
             on rejection draw from norm(max(p - q, 0)); so every emitted token has exactly the
             target distribution p (Leviathan et al. 2023, Chen et al. 2023)
    draft    MTP over the pairs (h_n, t_{n+1}) and, when d was kept, (h_{n+1}, t_{n+2}), writing its
             own latent cache (one more layer of the pool); the last pair's logits give the next draft

The MTP layer's attention reads its cache through the same block tables and slot mapping as the
main model. A rejected draft leaves stale rows at position n+1 (main and MTP); the next verify step
writes that position again before anything reads it, as queries only see positions up to their own.
"""

from __future__ import annotations

import torch

from moeco.model.mla import AttnInputs
from moeco.model.mtp import mtp_forward
from moeco.sampling import filtered_probs


def accept_or_resample(p_V: torch.Tensor, q_V: torch.Tensor, draft: int, generator=None) -> tuple[int, bool]:
    """One step of speculative sampling: (token, accepted). The token is distributed exactly as p."""
    u = torch.rand((), device=p_V.device, generator=generator)
    if u * q_V[draft] <= p_V[draft]:
        return draft, True
    residual = (p_V - q_V).clamp(min=0)
    total = residual.sum()
    residual = residual / total if total > 0 else p_V
    return int(torch.multinomial(residual, 1, generator=generator)), False


class MTPDrafter:
    def __init__(self, model, runner):
        self.model, self.runner = model, runner
        self.module = model.mtp[0]
        self.proposed = self.accepted = 0

    # ---- drafting -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _mtp(self, h_NSD, next_ids_NS, positions_NS, impl: str) -> torch.Tensor:
        """MTP hidden states over pairs (h_i, t_{i+1}) at positions_NS (slots already set)."""
        m = self.model
        cos, sin = m.rotary(positions_NS)
        inp = AttnInputs(cos, sin, positions_NS, self.runner.cache, absorb=impl == "absorbed")
        return mtp_forward(self.module, h_NSD, m.model.embed_tokens(next_ids_NS), inp)

    def _draft(self, engine, seqs, mtp_h_ND) -> None:
        logits = self.model.lm_head(self.module.shared_head.norm(mtp_h_ND)).float()
        if engine.vocab_limit < logits.shape[-1]:
            logits[:, engine.vocab_limit:] = float("-inf")
        greedy = [s.params.temperature == 0 for s in seqs]
        probs = None
        if not all(greedy):
            p = [s.params for s in seqs]
            dev = logits.device
            probs = filtered_probs(logits, torch.tensor([x.temperature for x in p], device=dev),
                                   torch.tensor([x.top_p for x in p], device=dev),
                                   torch.tensor([x.top_k for x in p], device=dev))
        drafts = logits.argmax(-1)
        if probs is not None:
            drawn = torch.multinomial(probs, 1).squeeze(-1)
            drafts = torch.where(torch.tensor(greedy, device=logits.device), drafts, drawn)
        for i, (s, d) in enumerate(zip(seqs, drafts.tolist())):
            room = s.num_computed + 2 <= engine.max_model_len - 1
            s.draft = [d] if room else []
            s.draft_probs = probs[i] if (probs is not None and not greedy[i] and room) else None

    def after_prefill(self, engine, items, h, tokens, done) -> None:
        """MTP over every prefilled chunk (filling its cache); drafts for the rows that sampled."""
        S = h.shape[1]
        nxt, pos = [], []
        sampled = {id(seq): t for (_, seq), t in zip(done, tokens.tolist())}
        for seq, n in items:
            c = seq.num_computed - n  # the engine already advanced num_computed
            ahead = seq.token_ids[c + 1:c + n + 1]
            if len(ahead) < n:
                ahead = ahead + [sampled[id(seq)]]
            nxt.append(ahead + [0] * (S - n))
            pos.append(list(range(c, c + n)) + [-1] * (S - n))
        dev = h.device
        pos_t = torch.tensor(pos, device=dev)
        self.runner._set_slots(pos_t, self.runner.cache.block_tables)
        mtp_h = self._mtp(h, torch.tensor(nxt, device=dev), pos_t, "plain")
        if done:
            rows = torch.tensor([i for i, _ in done], device=dev)
            last = torch.tensor([n - 1 for seq, n in items], device=dev)[rows]
            self._draft(engine, [s for _, s in done], mtp_h[rows, last])

    # ---- verify + draft -------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_step(self, engine, seqs):
        h, logits = self.runner.decode(seqs)  # (N, W, D), (N, W, V); W = 2 when any row has a draft
        logits = logits.float()
        if engine.vocab_limit < logits.shape[-1]:
            logits[..., engine.vocab_limit:] = float("-inf")
        W = logits.shape[1]
        first, p0 = engine._sample(seqs, logits[:, 0])
        second, p1 = engine._sample(seqs, logits[:, 1]) if W > 1 else (None, None)
        first_l, second_l = first.tolist(), (second.tolist() if second is not None else None)
        results, nxt, keep, pos = [], [], [], []
        for i, s in enumerate(seqs):
            n = s.num_computed
            pos.append([n, n + 1 if s.draft else -1][:W])
            new = [first_l[i]]
            ok = False
            if s.draft:
                d = s.draft[0]
                if s.params.temperature == 0:
                    ok = first_l[i] == d
                else:
                    tok, ok = accept_or_resample(p0[i], s.draft_probs, d, s.generator)
                    new = [tok]
                if ok:
                    new.append(second_l[i])
                self.proposed += 1
                self.accepted += ok
                s.spec_proposed += 1
                s.spec_accepted += ok
            s.num_computed = n + 1 + ok
            s.steps += 1
            engine.blocks.register_full_blocks(s)
            results.append((s, new))
            nxt.append(new + [0] * (W - len(new)) if W > 1 else new[:1])
            keep.append(1 if ok else 0)
        # MTP over positions n and n+1 (the slots the verify step used); draft from the last valid one
        dev = h.device
        pos_t = torch.tensor(pos, device=dev)
        self.runner._set_slots(pos_t, self.runner._block_tables(seqs))
        mtp_h = self._mtp(h, torch.tensor(nxt, device=dev)[:, :W], pos_t, "absorbed")
        self._draft(engine, seqs, mtp_h[torch.arange(len(seqs), device=dev), torch.tensor(keep, device=dev)])
        return results
