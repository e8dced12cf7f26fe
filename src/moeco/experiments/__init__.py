"""The paper's claims as commands: `moeco experiment NAME` (see docs/paper.md for the figures).

    accumulation  FP8 GEMM error vs K, with and without promotion every 128
    logfmt        wire codecs (BF16, E4M3, E5M2, LogFMT-8/10): error on real tensors, training, speed
    balance       aux-loss-free balancing vs the sequence-wise aux loss vs neither
    node-limit    node-limited routing: inter-node copies and bytes, and the quality cost
    mtp           acceptance of the MTP draft on held-out text (offline simulation)
"""

EXPERIMENTS = {
    "accumulation": "moeco.experiments.accumulation",
    "logfmt": "moeco.experiments.logfmt",
    "balance": "moeco.experiments.balance",
    "node-limit": "moeco.experiments.node_limit",
    "mtp": "moeco.experiments.mtp",
}
