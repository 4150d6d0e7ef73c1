"""Rebuild the policy's inputs for rollout samples: prompt (with image) + completion, right-padded.

The rollout engine saw each prompt as a list of token ids with the image placeholder already
expanded. The learner re-runs the processor on the same record and insists on the very same ids:
a mismatch (another processor version, other pixel bounds, a changed template) would otherwise be
trained on silently, or surface much later as "image features and image tokens do not match".
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from medvqa.prompt import render_prompt
from medvqa.record import MedVQARecord


class PromptMismatchError(ValueError):
    """The processor's prompt ids differ from the ids the rollout engine generated from."""


@dataclasses.dataclass
class EncodedPrompt:
    """One prompt through the processor, done once per step and shared by its G samples."""
    record_id: str
    input_ids: list[int]
    mm_token_type_ids: list[int]  # 1 on image placeholder tokens, 0 elsewhere
    pixel_values: torch.Tensor  # (patches, channels * patch volume)
    image_grid_thw: torch.Tensor  # (1, 3): temporal, height, width patches of its image


@dataclasses.dataclass
class SampleBatch:
    """A right-padded batch of samples; the images are held once per distinct prompt.

    `pixel_values` / `image_grid_thw` concatenate the distinct prompts' images in order of first
    use; `sample_prompt[i]` is the position of sample i's prompt among them.
    """
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 on prompt and completion tokens
    completion_mask: torch.Tensor  # (B, L) float, 1 on completion tokens only
    mm_token_type_ids: torch.Tensor  # (B, L) long, 1 on image placeholders of the prompt only
    pixel_values: torch.Tensor  # (patches of the distinct prompts, D)
    image_grid_thw: torch.Tensor  # (distinct prompts, 3)
    sample_prompt: torch.Tensor  # (B,) long, index into the distinct prompts
    prompt_keys: list[int]  # caller's key of each distinct prompt (to look up cached image features)
    min_prompt_len: int  # shortest prompt: logits before it can never score a completion token
    prompt_lens: torch.Tensor  # (B,) long, each sample's prompt length

    @property
    def sample_grid_thw(self) -> torch.Tensor:
        """One grid row per sample, as M-RoPE needs for each sequence of the batch."""
        return self.image_grid_thw[self.sample_prompt]

    def completion_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and mask from position `min_prompt_len` on: what logits from `min_prompt_len - 1` predict."""
        start = self.min_prompt_len
        return self.input_ids[:, start:], self.completion_mask[:, start:]


def encode_prompt(record: MedVQARecord, processor) -> EncodedPrompt:
    """The processor on the rendered prompt and the record's image (pixel bounds already set on it)."""
    text = render_prompt(record, processor)
    out = processor(text=[text], images=[record.load_image()], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    if "mm_token_type_ids" in out:
        types = out["mm_token_type_ids"][0].tolist()
    else:  # older processors: the placeholder token marks the image positions
        types = [int(t == processor.image_token_id) for t in ids]
    return EncodedPrompt(record.id, ids, types, out["pixel_values"], out["image_grid_thw"])


def check_prompt_ids(encoded: EncodedPrompt, expected: Sequence[int], image_token_id: int) -> None:
    """Raise PromptMismatchError naming the record when the two id lists differ."""
    got = encoded.input_ids
    if list(expected) == got:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    n_got, n_exp = got.count(image_token_id), list(expected).count(image_token_id)
    raise PromptMismatchError(
        f"record {encoded.record_id!r}: the learner's processor gives {len(got)} prompt tokens "
        f"({n_got} image tokens) but the rollout batch has {len(expected)} ({n_exp} image tokens); "
        f"first difference at position {first}. Check that both sides use the same processor, chat "
        f"template and model.min_pixels/max_pixels."
    )


def encode_prompts(records: Sequence[MedVQARecord], prompt_token_ids: Sequence[Sequence[int]],
                   processor) -> list[EncodedPrompt]:
    """Encode every prompt once and check it against the ids the engine saw."""
    if len(records) != len(prompt_token_ids):
        raise ValueError(f"{len(records)} records but {len(prompt_token_ids)} prompt id lists")
    encoded = []
    for record, expected in zip(records, prompt_token_ids):
        enc = encode_prompt(record, processor)
        check_prompt_ids(enc, expected, processor.image_token_id)
        encoded.append(enc)
    return encoded


def collate_samples(prompts: Sequence[EncodedPrompt], sample_prompt: Sequence[int],
                    completions: Sequence[Sequence[int]], pad_id: int,
                    prompt_keys: Optional[Sequence[int]] = None) -> SampleBatch:
    """Right-pad `prompt + completion` per sample; `sample_prompt[i]` indexes `prompts`.

    Only the prompts actually used are kept, each image once however many samples share it.
    """
    if len(sample_prompt) != len(completions) or not completions:
        raise ValueError(f"{len(sample_prompt)} sample prompts for {len(completions)} completions")
    keys = list(prompt_keys) if prompt_keys is not None else list(range(len(prompts)))
    distinct = list(dict.fromkeys(sample_prompt))  # first-use order
    local = {p: i for i, p in enumerate(distinct)}
    seqs = [prompts[p].input_ids + list(c) for p, c in zip(sample_prompt, completions)]
    width = max(len(s) for s in seqs)
    batch = len(seqs)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    completion = torch.zeros((batch, width), dtype=torch.float32)
    types = torch.zeros((batch, width), dtype=torch.long)
    for i, (p, seq) in enumerate(zip(sample_prompt, seqs)):
        n_prompt = len(prompts[p].input_ids)
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, :len(seq)] = 1
        completion[i, n_prompt:len(seq)] = 1.0
        types[i, :n_prompt] = torch.tensor(prompts[p].mm_token_type_ids, dtype=torch.long)
    return SampleBatch(
        input_ids=input_ids, attention_mask=attention, completion_mask=completion, mm_token_type_ids=types,
        pixel_values=torch.cat([prompts[p].pixel_values for p in distinct]),
        image_grid_thw=torch.cat([prompts[p].image_grid_thw for p in distinct]),
        sample_prompt=torch.tensor([local[p] for p in sample_prompt], dtype=torch.long),
        prompt_keys=[keys[p] for p in distinct],
        min_prompt_len=min(len(prompts[p].input_ids) for p in sample_prompt),
        prompt_lens=torch.tensor([len(prompts[p].input_ids) for p in sample_prompt], dtype=torch.long),
    )
