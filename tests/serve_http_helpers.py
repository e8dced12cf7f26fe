"""A tiny checkpoint with a real tokenizer, and a `moeco serve` process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny-test"


def build_checkpoint(out: Path, max_position_embeddings: int = 2048) -> Path:
    """A micro DeepSeek-V3-shaped model (random weights) + a 320-token byte-level BPE trained on a
    slice of the Python reference manual, saved the way `moeco train` saves its model directory."""
    import torch

    import moeco
    from helpers import micro_config
    from moeco.train.tokenizer import save_tokenizer, train_bpe

    docs = reference_text()
    tok = train_bpe(docs, 320)
    torch.manual_seed(0)
    model = moeco.Transformer(micro_config(vocab_size=384, max_position_embeddings=max_position_embeddings))
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def reference_text() -> list[str]:
    """The Python reference manual's topics (always installed, instant to read)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m moeco serve MODEL --port P ...` in a subprocess; waits for /health."""

    def __init__(self, model_dir: Path, *extra: str, timeout: float = 180.0, launcher: tuple[str, ...] = ()):
        """launcher: what runs `-m moeco` (e.g. ("-m", "torch.distributed.run", "--nproc-per-node", "2"))."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        env.pop("MOECO_API_KEY", None)
        cmd = [sys.executable, *launcher, "-m", "moeco", "serve", str(model_dir), "--port", str(self.port),
               "--served-model-name", MODEL_NAME, "--cache-bytes", str(8 << 20), "--log-level", "warning", *extra]
        self.log = open(Path(model_dir) / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moeco serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"moeco serve did not come up in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text, parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)
