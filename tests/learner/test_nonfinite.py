"""A non-finite loss, gradient or learning rate stops the step before the optimiser writes the weights.

Real DeepSpeed ranks of world size 1 on gloo (as in test_learner.py), fed a rollout batch whose rewards
make the loss NaN, or built with an infinite learning rate that config validation would have refused.
"""
import math

import pytest
import torch

from cluster_utils import free_port

from launcher.config import ConfigError, load_config
from learner.finite_guard import NonFiniteStepError
from medvqa.prompt import load_processor, render_prompt
from medvqa.synthetic import make_synthetic_split
from protocol.batch import RolloutBatch

TEXTS = ["<think>left</think><answer>A</answer>", "<answer>B</answer>", "<think>x</think><answer>B</answer>",
         "no answer"]


def _cfg(model_dir, *overrides):
    return load_config(None, [f"model.path={model_dir}", "rollout.prompts_per_step=2", "rollout.group_size=4",
                              "rollout.max_new_tokens=32", "learner.micro_batch_size=3", "learner.lr=1e-2",
                              "grpo.beta=0.0", "train.steps=10", *overrides])


@pytest.fixture(scope="module")
def port():
    return free_port()


@pytest.fixture(scope="module")
def records():
    return make_synthetic_split("MRI", "train", 2, seed=0, num_options=2, image_size=56)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    return load_processor(tiny_model_dir, cfg.model.min_pixels, cfg.model.max_pixels)


def _batch(records, processor, rewards: list[float]) -> RolloutBatch:
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    comps = [tok(t, add_special_tokens=False)["input_ids"] + [end] for _ in records for t in TEXTS]
    prompts = [processor(text=[render_prompt(r, processor)], images=[r.load_image()],
                         return_tensors="pt")["input_ids"][0].tolist() for r in records]
    return RolloutBatch(
        record_ids=[r.id for r in records], group_size=len(TEXTS), prompt_token_ids=prompts,
        completion_token_ids=comps, completion_texts=[t for _ in records for t in TEXTS],
        sampling_logprobs=[[-1.0] * len(c) for c in comps], rewards={"format": rewards}, total_rewards=rewards,
        finish_reasons=["stop"] * len(comps), weight_version=0)


GOOD = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
NAN_GROUP = [1.0, 0.0, 1.0, 0.0, float("nan"), 1.0, 0.0, 0.0]  # one group's advantages become NaN


def _all_finite(rank) -> bool:
    from learner.zero_params import full_named_parameters

    return all(bool(torch.isfinite(t).all()) for _, t in full_named_parameters(rank.hf_model, rank.param_names))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_nan_loss_stops_the_step_before_the_update(tiny_model_dir, port, records, processor, stage):
    from learner.actor import LearnerRank

    rank = LearnerRank(_cfg(tiny_model_dir, f"learner.zero_stage={stage}"), tiny_model_dir, 0, 1, "127.0.0.1", port)
    start = rank.weights_checksum()
    good = rank.train_on(_batch(records, processor, GOOD), records)
    moved = rank.weights_checksum()
    assert math.isfinite(good["loss"]) and good["grad_norm"] > 0
    assert abs(moved - start) > 1e-6  # an applied update shows in the checksum
    with pytest.raises(NonFiniteStepError, match=r"^optimiser step 2: non-finite values, loss=nan, "
                       r"grad_norm=nan \(first non-finite gradient: hf\.\S+\), lr=0\.01; the update was not applied$"):
        rank.train_on(_batch(records, processor, NAN_GROUP), records)
    assert rank.weights_checksum() == moved
    assert _all_finite(rank)


@pytest.mark.timeout(300)
def test_infinite_learning_rate_stops_the_first_step(tiny_model_dir, port, records, processor):
    from learner.actor import LearnerRank

    with pytest.raises(ConfigError, match=r"config key 'learner.lr': must be a finite number, got inf"):
        _cfg(tiny_model_dir, "learner.lr=.inf")
    cfg = _cfg(tiny_model_dir, "learner.zero_stage=2")
    cfg.learner.lr = float("inf")  # past validation, as a schedule bug could produce
    rank = LearnerRank(cfg, tiny_model_dir, 0, 1, "127.0.0.1", port)
    start = rank.weights_checksum()
    with pytest.raises(NonFiniteStepError, match=r"optimiser step 1: non-finite values, loss=[-0-9.e]+, "
                       r"grad_norm=finite, lr=inf; the update was not applied"):
        rank.train_on(_batch(records, processor, GOOD), records)
    assert rank.weights_checksum() == start and _all_finite(rank)


@pytest.mark.timeout(300)
def test_sft_step_has_the_same_guard(tiny_model_dir, port, records, processor):
    """`medvlm-r1 sft` trains through LearnerRank.train_sft: a good step moves the weights, an infinite rate
    stops the next before its update."""
    from launcher.sft_loop import learner_view
    from learner.actor import LearnerRank

    cfg = learner_view(_cfg(tiny_model_dir, "learner.zero_stage=2", "sft.batch_size=2", "sft.lr=1e-2"), 8)
    rank = LearnerRank(cfg, tiny_model_dir, 0, 1, "127.0.0.1", port)
    start = rank.weights_checksum()
    good = rank.train_sft(records, "think_answer")
    assert math.isfinite(good["loss"]) and good["grad_norm"] > 0
    moved = rank.weights_checksum()
    assert abs(moved - start) > 1e-6
    for group in rank.engine.optimizer.param_groups:
        group["lr"] = float("inf")  # as a schedule bug could produce
    with pytest.raises(NonFiniteStepError, match=r"^optimiser step 2: non-finite values, loss=[0-9.e+-]+, "
                       r"grad_norm=finite, lr=inf; the update was not applied$"):
        rank.train_sft(records, "think_answer")
    assert rank.weights_checksum() == moved and _all_finite(rank)
