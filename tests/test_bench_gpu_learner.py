"""bench/gpu_learner.py's code path on CPU at the tiny shape, fp32: the numbers it reports must be sane."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_learner_bench_runs_at_a_tiny_shape_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    res = subprocess.run([sys.executable, "bench/gpu_learner.py", "--size", "tiny", "--device", "cpu",
                          "--prompts", "2", "--prompt-tokens", "140", "--completion-tokens", "12", "--image-size", "56",
                          "--steps", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=850)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["finite"] and r["grad_norm"][0] > 0
    assert r["zero_stage"] == 3 and r["gradient_checkpointing"] and r["micro_batch_size"] == 4  # the paper config's
    assert r["samples"] == 8 and all(140 <= n <= 143 for n in r["prompt_tokens"]), r["prompt_tokens"]
    # fp32 on CPU: the learner's ZeRO-3 forward and transformers' own agree to rounding.
    assert r["logprob_tokens"] == 12 and r["logprob_diff/max_abs"] < 1e-4, r
    assert -20 < r["logprob/mean"] < 0 and r["step_s"] > 0 and r["tokens_per_s"] > 0
    assert "step time" in res.stdout and "log-prob vs HF" in res.stdout
