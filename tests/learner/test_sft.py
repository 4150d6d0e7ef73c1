"""The SFT baseline: targets, the prompt-masked loss (by hand), its config, one DeepSpeed rank."""
import math

import pytest
import torch

from cluster_utils import free_port
import yaml

from launcher.config import ConfigError, load_config
from launcher.sft_loop import learner_view, sft_steps
from learner.model_inputs import EncodedPrompt, collate_samples
from learner.sft import completion_cross_entropy, completion_ids, masked_sum, target_text
from medvqa.synthetic import make_synthetic_split
from rewards.rules import extract_answer, format_reward


def _prompt(ids):
    """A hand-made prompt: its ids, one image token, a dummy image of 4 patches."""
    return EncodedPrompt("p", list(ids), [0, 1] + [0] * (len(ids) - 2), torch.zeros(4, 2), torch.tensor([[1, 2, 2]]))


def test_sft_loss_masks_prompt_and_padding_tokens_by_hand():
    # Prompt lengths 3 and 5, completions [1, 2] and [3]: the batch is 6 wide and min_prompt_len 3, so
    # the completion frame covers positions 3..5. Row 0: tokens 1, 2, then padding. Row 1: prompt
    # tokens 40, 41 at positions 3, 4, then its completion token 3 at position 5.
    batch = collate_samples([_prompt([30, 31, 32]), _prompt([30, 31, 32, 40, 41])], [0, 1], [[1, 2], [3]], pad_id=0)
    assert batch.min_prompt_len == 3 and batch.input_ids.shape == (2, 6)
    vocab = 50
    # Logits from position min_prompt_len - 1 = 2 on: 4 positions, the last predicts nothing.
    logits = torch.zeros(2, 4, vocab, requires_grad=False)
    # On each completion token: its logit ln(vocab - 1), so p = (V-1) / ((V-1) + (V-1)) = 1/2, CE = ln 2.
    for row, col, token in ((0, 0, 1), (0, 1, 2), (1, 2, 3)):
        logits[row, col, token] = math.log(vocab - 1)
    # Where a prompt or pad token is predicted, the model is badly wrong: counted, these would dominate.
    for row, col, token in ((0, 2, 0), (1, 0, 40), (1, 1, 41)):
        logits[row, col, token] = -30.0
    logits[:, 3] = float("nan")  # the position past the end predicts nothing and must not enter at all
    logits.requires_grad_(True)
    ce, mask = completion_cross_entropy(logits, batch)
    assert mask.tolist() == [[1, 1, 0], [0, 0, 1]]
    assert ce[1, 0] > 30 and ce[0, 2] > 30  # the prompt/pad positions are really wrong ...
    loss = masked_sum(ce, mask) / mask.sum()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # ... and yet the loss is 3 x ln 2 / 3
    loss.backward()
    grad_norm = logits.grad.norm(dim=-1)
    assert grad_norm[0, :2].min() > 0 and grad_norm[1, 2] > 0
    assert grad_norm[0, 2:].max() == 0 and grad_norm[1, :2].max() == 0 and grad_norm[1, 3] == 0


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from medvqa.prompt import load_processor

    return load_processor(tiny_model_dir).tokenizer


def test_targets_read_back_as_the_answer(tok):
    records = make_synthetic_split("MRI", "train", 8, seed=0, question_types=["location"], num_options=4)
    assert len({r.answer for r in records}) >= 3
    for r in records:
        think, letter = target_text(r, "think_answer"), target_text(r, "letter")
        assert letter == f"<answer>{r.answer}</answer>"
        assert format_reward(think) == 1.0 and extract_answer(think, r.options) == r.answer
        assert format_reward(letter) == 0.0 and extract_answer(letter, r.options) == r.answer
        ids = completion_ids(tok, think)
        assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert tok.decode(ids[:-1]) == think
        assert len(ids) <= 48  # fits the tiny run's completion budget (rollout.max_new_tokens)
    with pytest.raises(ValueError, match="sft.target"):
        target_text(records[0], "cot")


GRPO_ONLY = ("checkpoint_every", "keep_checkpoints", "resume")


def test_tiny_sft_config_matches_the_grpo_run_but_for_its_objective():
    grpo = yaml.safe_load(open("configs/tiny_cpu.yaml"))
    sft = yaml.safe_load(open("configs/tiny_cpu_sft.yaml"))
    for key in GRPO_ONLY:  # full checkpoints and resume belong to `train`; an SFT run has none
        grpo["train"].pop(key, None)
    for section in set(grpo) | set(sft):
        if section not in ("sft", "logging"):
            assert sft.get(section) == grpo.get(section), f"section {section} of tiny_cpu_sft.yaml drifted"
    cfg = load_config("configs/tiny_cpu_sft.yaml")
    assert sft_steps(cfg, 600) == 200
    assert cfg.sft.batch_size == cfg.rollout.prompts_per_step and cfg.sft.steps == cfg.train.steps


def test_budget_and_learner_view():
    cfg = load_config(None, ["sft.epochs=3", "sft.batch_size=16", "sft.lr=2e-5", "grpo.beta=0.04",
                             "learner.num_ranks=2", "rollout.prompts_per_step=8"])
    assert sft_steps(cfg, 600) == 113  # ceil(3 * 600 / 16)
    view = learner_view(cfg, 113)
    assert (view.learner.lr, view.grpo.beta, view.train.steps, view.learner.mu) == (2e-5, 0.0, 113, 1)
    from learner.ds_config import samples_per_rank

    assert samples_per_rank(view) == 8  # 16 records over 2 ranks, one sample each
    assert sft_steps(load_config(None, ["sft.steps=7", "sft.epochs=5"]), 600) == 7
    assert cfg.learner.lr == 1e-6  # the user's config is left as it was


@pytest.mark.parametrize("override, key", [
    (["sft.target=cot"], "sft.target"),
    (["sft.lr=0"], "sft.lr"),
    (["sft.epochs=0"], "sft.epochs"),
    (["sft.steps=0"], "sft.steps"),
    (["sft.batch_size=5", "learner.num_ranks=2", "rollout.prompts_per_step=4"], "sft.batch_size"),
])
def test_impossible_sft_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, override)


def _hand_loss(hf, processor, records, target) -> tuple[float, int]:
    """Token-mean CE of the targets, one record at a time through the plain HF forward."""
    from learner.model_inputs import encode_prompt

    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            enc, comp = encode_prompt(r, processor), completion_ids(processor.tokenizer, target_text(r, target))
            ids = torch.tensor([enc.input_ids + comp])
            types = torch.tensor([enc.mm_token_type_ids + [0] * len(comp)])
            logits = hf(input_ids=ids, pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw,
                        mm_token_type_ids=types).logits[0, len(enc.input_ids) - 1:-1]
            total += float(torch.nn.functional.cross_entropy(logits.double(), torch.tensor(comp), reduction="sum"))
            count += len(comp)
    return total / count, count


@pytest.mark.parametrize("target", ["think_answer", "letter"])
def test_sft_steps_on_a_deepspeed_rank(tiny_model_dir, target):
    """Micro-batches of 3 over 5 records (two image sizes): the step's loss is the hand-computed token mean
    before the update; repeated steps on the same records drive it down."""
    from learner.actor import LearnerRank

    records = (make_synthetic_split("MRI", "train", 3, seed=0, num_options=2, image_size=56)
               + make_synthetic_split("MRI", "train", 2, seed=1, num_options=4, image_size=84))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "learner.micro_batch_size=3", "sft.batch_size=5",
                             "sft.lr=3e-3", "sft.steps=8", "learner.zero_stage=2", "logging.wandb=false"])
    rank = LearnerRank(learner_view(cfg, 8), tiny_model_dir, 0, 1, "127.0.0.1", free_port())
    expected, count = _hand_loss(rank.hf_model, rank.processor, records, target)
    first = rank.train_sft(records, target)
    assert first["num_tokens"] == count
    assert first["loss"] == pytest.approx(expected, rel=1e-4)
    assert first["lr"] == pytest.approx(3e-3) and first["grad_norm"] > 0
    losses = [rank.train_sft(records, target)["loss"] for _ in range(7)]
    assert losses[-1] < 0.6 * first["loss"], losses
    after, _ = _hand_loss(rank.hf_model, rank.processor, records, target)
    assert after < losses[-1]  # the last step's update lowered it once more


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sft_command_writes_a_run_and_evaluates_the_trained_weights(tiny_model_dir, tok, tmp_path):
    """`medvlm-r1 sft` over Ray: 2 ZeRO-3 learner ranks, 1 vLLM worker evaluating before and after."""
    import json
    import subprocess
    import sys

    from launcher.metrics import SFT_STEP_KEYS

    run = tmp_path / "sft"
    cmd = [sys.executable, "-m", "launcher", "sft", "configs/tiny_cpu_sft.yaml", f"model.path={tiny_model_dir}",
           f"logging.run_dir={run}", "logging.progress_bar=false", "learner.num_ranks=2", "learner.zero_stage=3",
           "sft.steps=6", "sft.batch_size=8", "sft.lr=3e-3", "train.format_warmup_steps=0",
           "data.num_eval_per_modality=4", "cluster.cpus_per_actor=0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert load_config(str(run / "config.yaml")).sft.steps == 6
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all(k in r for r in steps for k in SFT_STEP_KEYS)
    # Every synthetic answer is one letter token: 8 records x the same target length per step.
    per_record = len(completion_ids(tok, "<think>I look at the scan.</think><answer>A</answer>"))
    assert {r["num_tokens"] for r in steps} == {8 * per_record}
    assert {r["lr"] for r in steps} == {3e-3} and steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["epoch"] == pytest.approx(48 / 600)
    assert [r["step"] for r in rows if "eval/MRI/accuracy" in r] == [0, 6]
    before, after = ([json.loads(line) for line in open(run / "eval" / f"step{s:06d}" / "predictions.jsonl")]
                     for s in (0, 6))
    assert [p["id"] for p in before] == [p["id"] for p in after] and len(after) == 12
    # Greedy decoding of unchanged weights would repeat itself: the workers evaluated the trained policy.
    assert sum(a["completion"] != b["completion"] for a, b in zip(before, after)) >= 10
    assert (run / "final" / "config.json").exists() and list(run.glob("wandb/offline-run-*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "sft" and summary["steps"] == 6 and summary["target"] == "think_answer"
    proc = subprocess.run([sys.executable, "-m", "launcher", "report", str(run)], capture_output=True, text=True)
    assert proc.returncode == 0 and "| start of SFT (step 0) |" in (run / "report.md").read_text()
