"""moeco plan serve: the disaggregation sizing formulas (moeco.plan.serving)."""

import json
import math
import subprocess
import sys

import pytest

from moeco.errors import ConfigError
from moeco.plan.hardware import get_device
from moeco.plan.serving import decode_step_seconds, plan_serve


def test_decode_step_reads_weights_and_caches():
    h200 = get_device("H200")
    one, many = (decode_step_seconds("deepseek-v3", h200, b, 2048, gpus=8) for b in (1, 256))
    assert many > one  # more experts touched, more caches read
    # at batch 1 a token reads 8 of 256 routed experts per layer; at 256 nearly all of them
    big = decode_step_seconds("deepseek-v3", h200, 4096, 2048, gpus=8)
    kv = 4096 * 70_272 * 2048 / (0.8 * 4800e9 * 8)
    assert big > kv  # the caches alone take this long


def test_plan_serve_ratio_and_slos():
    h200 = get_device("H200")
    r = plan_serve("deepseek-v3", h200, rate=40, input_len=4096, output_len=512, tpot_ms=50, ttft_ms=2000)
    assert r["gpus_per_worker"] == 8  # 671B FP8 weights need 8 x 141 GB
    assert r["tpot_slo_met"] and r["decode_step_ms"] <= 50
    tight = plan_serve("deepseek-v3", h200, rate=40, input_len=4096, output_len=512, tpot_ms=r["decode_step_ms"] / 2)
    assert tight["decode_batch"] < r["decode_batch"]
    p, d = r["prefill_workers"], r["decode_workers"]
    assert p == math.ceil(40 * 4096 / (r["prefill_tokens_per_s_per_gpu"] * 8))
    assert d == math.ceil(40 * 512 / (r["decode_tokens_per_s_per_gpu"] * 8))
    assert r["handover_bytes_per_request"] == 70_272 * 4096
    assert r["handover_ms_per_request"] == pytest.approx(70_272 * 4096 / 50e9 * 1e3)
    longer = plan_serve("deepseek-v3", h200, rate=40, input_len=4096, output_len=2048)
    assert longer["decode_per_prefill_gpu"] > r["decode_per_prefill_gpu"]
    with pytest.raises(ConfigError):
        plan_serve("deepseek-v3", h200, rate=0, input_len=1, output_len=1)


def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "moeco", "plan", "serve", "small", "--rate", "5", "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["ratio"]
