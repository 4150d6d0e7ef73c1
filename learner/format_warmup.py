"""A short supervised warm-up on the answer FORMAT only, before GRPO.

A random model almost never writes `<think>..</think><answer>X</answer>`, so every group's
rewards are equal and GRPO has no signal. The warm-up teaches the tags and nothing else: the
reasoning text is drawn from a fixed pool of generic sentences and the letter uniformly among the
record's options, both independent of the image, so the policy learns where to put an answer
but not which one. The vision tower is left untouched (frozen) for the same reason.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Optional, Sequence

import torch

from learner.hf_export import save_hf_checkpoint
from learner.model_inputs import EncodedPrompt, collate_samples, encode_prompt
from learner.policy import PolicyModule, batch_kwargs
from learner.sft import completion_cross_entropy, completion_ids, masked_sum
from medvqa.record import MedVQARecord

log = logging.getLogger(__name__)

# Generic, image-independent reasoning; short, so warm completions fit small token budgets.
REASONING = (
    "The question is about the scan.",
    "What is in this image?",
    "I look at the scan.",
)
BATCH_SIZE = 8


def format_text(reasoning: str, letter: str) -> str:
    # No newline between the blocks: "\n" already follows "assistant" in the prompt, and a head-only
    # warm-up reads mostly the current token, so one token must not lead to two different next tokens.
    return f"<think>{reasoning}</think><answer>{letter}</answer>"


@dataclasses.dataclass
class FormatTarget:
    """Completion token ids (ending in <|im_end|>) for one record, with the letter drawn at random.

    Where the letters differ in exactly one token, the loss there is the mean cross-entropy over
    all the record's letters: the expectation over the random letter, so the policy converges to
    a uniform answer among the options without the noise of one drawn letter per sample.
    """
    ids: list[int]
    letter_pos: Optional[int]  # index in `ids` of the letter token, None when letters tokenise unevenly
    letter_ids: list[int]  # token id of each option letter at `letter_pos`


def format_target(tokenizer, rng: random.Random, record: MedVQARecord) -> FormatTarget:
    reasoning = rng.choice(REASONING)
    letters = sorted(record.options)
    variants = [completion_ids(tokenizer, format_text(reasoning, letter)) for letter in letters]
    chosen = variants[rng.randrange(len(letters))]
    differ = None
    if all(len(v) == len(chosen) for v in variants):
        differ = [i for i in range(len(chosen)) if len({v[i] for v in variants}) > 1]
    if differ is None or len(differ) != 1:
        return FormatTarget(chosen, None, [])
    return FormatTarget(chosen, differ[0], [v[differ[0]] for v in variants])


class _PromptCache:
    """Each drawn record goes through the processor once; its image features are computed once."""

    def __init__(self, processor, policy: PolicyModule, device: torch.device):
        self.processor, self.policy, self.device = processor, policy, device
        self.prompts: dict[int, EncodedPrompt] = {}
        self.feats: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def get(self, index: int, record: MedVQARecord) -> EncodedPrompt:
        if index not in self.prompts:
            enc = encode_prompt(record, self.processor)
            self.prompts[index] = enc
            self.feats[index] = self.policy(pixel_values=enc.pixel_values.to(self.device),
                                            image_grid_thw=enc.image_grid_thw.to(self.device))
        return self.prompts[index]


def _step_loss(policy: PolicyModule, cache: _PromptCache, records, rng: random.Random) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens of one batch of random format targets."""
    picks = [rng.randrange(len(records)) for _ in range(min(BATCH_SIZE, len(records)))]
    prompts = [cache.get(i, records[i]) for i in picks]
    tok = cache.processor.tokenizer
    targets = [format_target(tok, rng, records[i]) for i in picks]
    batch = collate_samples(prompts, list(range(len(picks))), [t.ids for t in targets], tok.pad_token_id or 0,
                            prompt_keys=picks)
    feats = torch.cat([cache.feats[k] for k in batch.prompt_keys])
    logits = policy(**batch_kwargs(batch, feats, cache.device))
    ce, mask = completion_cross_entropy(logits, batch)
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        if target.letter_pos is not None:
            col = len(prompt.input_ids) - batch.min_prompt_len + target.letter_pos
            logp = torch.log_softmax(logits[row, col].float(), dim=-1)
            ce[row, col] = -logp[target.letter_ids].mean()
    return masked_sum(ce, mask) / mask.sum()


def warmup_format(model_path: str, out_dir: str, records: Sequence[MedVQARecord], steps: int, lr: float,
                  seed: int, min_pixels: int, max_pixels: int) -> str:
    """`steps` AdamW steps (batches of 8 random records) on format targets; saves an HF
    checkpoint with the processor files to `out_dir` and returns its path."""
    from transformers import Qwen2VLForConditionalGeneration

    from medvqa.prompt import load_processor

    if not records:
        raise ValueError("format warm-up needs at least one training record")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = load_processor(model_path, min_pixels, max_pixels)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf = Qwen2VLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).to(device)
    hf.model.visual.requires_grad_(False)
    # Only the token embeddings, the output head and the norms learn the format: trained decoder
    # layers learn to ignore the image (the targets carry no image information) and GRPO would then
    # start from a policy blind to the very signal it must learn to use.
    hf.model.language_model.layers.requires_grad_(False)
    policy = PolicyModule(hf).train()
    optimizer = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    cache, start, loss = _PromptCache(processor, policy, device), time.perf_counter(), None
    for step in range(steps):
        loss = _step_loss(policy, cache, records, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            log.info("format warm-up step %d/%d: loss %.4f", step + 1, steps, loss.item())
    log.info("format warm-up: %d steps in %.1f s, final loss %s", steps, time.perf_counter() - start,
             "n/a" if loss is None else f"{loss.item():.4f}")
    return save_hf_checkpoint(hf.eval().cpu(), out_dir, model_path)
