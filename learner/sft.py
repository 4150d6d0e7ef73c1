"""Supervised fine-tuning on the answer: the baseline GRPO is compared with, on the same records.

The paper reports SFT on the same MRI data but publishes no SFT recipe, so the target is a choice
(`sft.target`, one of TARGETS):
- "think_answer": `<think>THINK_TEXT</think><answer>B</answer>`, the format the prompt asks for. No
  reasoning annotations exist (that is the paper's point), so the think block holds one fixed sentence.
- "letter": `<answer>B</answer>`, the letter alone. It stays inside the answer tags because the
  evaluation (the paper's `<answer>\\s*([A-Z])\\s*</answer>`) reads nothing else: a bare "B" would
  score zero however right it is.

The loss is the token-mean cross-entropy over target tokens only: prompt (and its image), padding
and nothing else is masked out by the completion mask that `collate_samples` builds.
"""
from __future__ import annotations

from typing import Sequence

import torch

from learner.finite_guard import GradientWatch, check_step
from learner.model_inputs import SampleBatch, collate_samples, encode_prompt
from learner.policy import batch_kwargs
from learner.train_step import plain_grad_norm, reduce_over_ranks
from medvqa.record import MedVQARecord

TARGETS = ("think_answer", "letter")
THINK_TEXT = "I look at the scan."  # short: the target must fit small completion budgets (tiny run: 48)


def target_text(record: MedVQARecord, target: str) -> str:
    if target == "think_answer":
        # No newline between the blocks, as in the format warm-up's targets.
        return f"<think>{THINK_TEXT}</think><answer>{record.answer}</answer>"
    if target == "letter":
        return f"<answer>{record.answer}</answer>"
    raise ValueError(f"unknown SFT target {target!r} (sft.target); expected one of {TARGETS}")


def completion_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a completion as the policy should write it: the text, then <|im_end|> to stop."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def completion_cross_entropy(logits: torch.Tensor, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [B, T] in the completion frame, and its mask (1 on completion tokens).

    `logits` are the policy's from position min_prompt_len - 1 on (as `batch_kwargs` keeps them);
    dropping the last, each predicts the token one to its right.
    """
    tokens, mask = batch.completion_targets()
    frame = logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(frame.transpose(1, 2), tokens.to(frame.device), reduction="none")
    return ce, mask.to(frame.device)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked-in positions; a where, not a product: an inf at a masked-out position would give NaN."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def sft_micro_batches(records: Sequence[MedVQARecord], processor, target: str, size: int) -> list[SampleBatch]:
    """Prompt + target per record, right-padded, in micro-batches of `size` records."""
    prompts = [encode_prompt(r, processor) for r in records]
    tok = processor.tokenizer
    ids = [completion_ids(tok, target_text(r, target)) for r in records]
    pad = tok.pad_token_id or 0
    chunks = [list(range(s, min(s + size, len(records)))) for s in range(0, len(records), size)]
    return [collate_samples(prompts, idx, [ids[i] for i in idx], pad) for idx in chunks]


def sft_step(engine, micro: Sequence[SampleBatch], device, world_size: int,
             watch_gradients: bool = True) -> dict[str, float]:
    """One optimiser step over this rank's micro-batches: the token mean over every rank's target tokens.

    Each micro-batch contributes its CE sum over the step's total token count (times world_size,
    since DeepSpeed averages gradients over ranks), so accumulation gives exactly the token mean.
    Before the update, every rank raises NonFiniteStepError if the step's loss, any rank's gradients or
    the rate are not finite (GRPO's guard, learner/finite_guard.py; `watch_gradients` false for fp16,
    whose overflows DeepSpeed's loss scaler skips).
    """
    if not micro:
        raise ValueError("sft_step got no micro-batches")
    lr = engine.get_lr()[0]  # the rate this step applies (the scheduler moves on inside step())
    local = sum(float(mb.completion_mask.sum()) for mb in micro)
    (total,) = reduce_over_ranks([local], world_size, device)
    ce_sum, norm = 0.0, None
    with GradientWatch(engine.module) as watch:
        for m, mb in enumerate(micro):
            last = m == len(micro) - 1
            engine.set_gradient_accumulation_boundary(last)
            ce, mask = completion_cross_entropy(engine(**batch_kwargs(mb, None, device)), mb)
            loss_sum = masked_sum(ce, mask)
            engine.backward(loss_sum * world_size / total, scale_wrt_gas=False)
            ce_sum += float(loss_sum.detach())
            if last:
                grad_sq, bad_param = watch.squared_sum() if watch_gradients else (0.0, None)
                loss, grad_sq = reduce_over_ranks([ce_sum / total, grad_sq], world_size, device)
                check_step(loss, grad_sq, float(lr), bad_param, engine.global_steps + 1)
                if engine.zero_optimization_stage() == 0:
                    norm = plain_grad_norm(engine)  # DeepSpeed reports none without ZeRO
            engine.step()
    (ce_sum,) = reduce_over_ranks([ce_sum], world_size, device)
    ds_norm = engine.get_global_grad_norm()
    norm = norm if ds_norm is None else ds_norm
    return {"loss": ce_sum / total, "num_tokens": total, "lr": float(lr),
            "grad_norm": float(norm) if norm is not None else float("nan")}
