"""EP training against one process over N steps: the largest loss difference, for both dispatchers (CPU, gloo).

    PYTHONPATH=src python tools/ep_equality.py --steps 20

Uses the configuration of tests/test_parallel_train.py (4 ranks as 2 nodes x 2, EP 4, fp32) on a
generated word corpus; prints max |loss_EP - loss_single| over the steps.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ep_workers import train_run  # noqa: E402
from parallel_helpers import run_ranks  # noqa: E402
from test_parallel_train import OVERRIDES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    from moeco.train.config import TrainConfig
    from moeco.train.trainer import train

    d = Path(tempfile.mkdtemp())
    rng = random.Random(0)
    words = "the for statement module import class def return value python list dict".split()
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)))
    base = [f'data.path="{d / "text.txt"}"'] + OVERRIDES + [f"train.steps={a.steps}", "checkpoint.every=0"]
    ref: dict = {}
    train(TrainConfig().with_overrides(base), d / "single", verbose=False,
          on_step=lambda s, r: ref.__setitem__(s, r["loss"]))
    for disp in ("two_hop", "direct"):
        res = run_ranks(train_run, 4, base + ["parallel.ep=4", f'parallel.dispatcher="{disp}"'], d / disp,
                        out_dir=d / f"r-{disp}")
        losses = res[0]["losses"]
        worst = max(abs(losses[s][0] - ref[s]) for s in ref)
        print(f"{disp:8} max |loss - single| over {a.steps} steps: {worst:.2e}  (loss {ref[1]:.3f} -> "
              f"{ref[a.steps]:.3f}; {losses[a.steps][1]:.0f} bytes/token between nodes)")


if __name__ == "__main__":
    main()
