"""Prefill/decode disaggregation: prefill and decode on separate workers, latent blocks handed over.

    worker     a prefill or a decode worker: one engine and cache pool behind a small HTTP control API
    transfer   the hand-over: latent rows + first token over torch.distributed point-to-point
    router     the OpenAI front door (moeco.serve.server) choosing workers by load and relaying tokens
    cli        `moeco serve MODEL --role prefill|decode|router` and `--disaggregate`
"""
