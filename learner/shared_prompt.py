"""The G samples of a prompt share it: the prompt goes through the model once, and every completion
continues from its key/value cache.

A GRPO batch holds G completions per prompt, and the prompt (system turn, image, question, task text)
is often as long as a completion. Running `prompt + completion` per sample computes the prompt G times;
here each distinct prompt runs once, its cache is repeated for its samples (an indexing op, so the
gradient of every sample flows back into the one prompt pass), and the completions run on top. The
logits, and the gradient, are those of the full pass up to float rounding.

The logits come back in the full pass's frame, (B, L - keep_from, V) with L the longest
`prompt + completion`, so that callers cannot tell the two apart; positions before a sample's
completion hold zeros there (they are masked out as prompt positions anyway).
"""
from __future__ import annotations

import torch


def _left_padded_prompts(input_ids, mm_token_type_ids, first_rows, prompt_lens):
    """(K, P) ids, token types and mask of the distinct prompts, left-padded so they all end at column P - 1."""
    lens = prompt_lens[first_rows]
    width = int(lens.max())
    src = torch.arange(width, device=input_ids.device) - (width - lens)[:, None]  # column in the sample's row
    valid = src >= 0
    src = src.clamp(min=0)
    ids = torch.where(valid, input_ids[first_rows].gather(1, src), 0)
    types = torch.where(valid, mm_token_type_ids[first_rows].gather(1, src), 0)
    return ids, types, valid.long()


def _completions(input_ids, attention_mask, prompt_lens):
    """(B, C) completion ids, right-padded, and their mask."""
    lens = attention_mask.sum(1) - prompt_lens
    width = max(int(lens.max()), 1)
    cols = torch.arange(width, device=input_ids.device)
    valid = cols[None, :] < lens[:, None]
    src = (prompt_lens[:, None] + cols[None, :]).clamp(max=input_ids.shape[1] - 1)
    return torch.where(valid, input_ids.gather(1, src), 0), valid


def shared_prompt_logits(hf, input_ids, attention_mask, mm_token_type_ids, sample_prompt, image_embeds,
                         image_grid_thw, prompt_lens, keep_from: int) -> torch.Tensor:
    """Logits of the full pass's frame from one pass per distinct prompt plus one over the completions.

    `sample_prompt[i]` numbers sample i's prompt among the distinct ones (0..K-1, in first-use order,
    matching `image_grid_thw` and `image_embeds`); `prompt_lens[i]` is its prompt's length.
    """
    text, embed = hf.model.language_model, hf.get_input_embeddings()
    k = int(sample_prompt.max()) + 1
    first_rows = torch.stack([(sample_prompt == p).nonzero()[0, 0] for p in range(k)])
    ids, types, mask = _left_padded_prompts(input_ids, mm_token_type_ids, first_rows, prompt_lens)
    embeds = embed(ids)
    embeds = embeds.masked_scatter((types == 1).unsqueeze(-1).expand_as(embeds), image_embeds.to(embeds.dtype))
    positions, deltas = hf.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw,
                                                attention_mask=mask)
    prompt = text(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=True)
    cache = prompt.past_key_values
    cache.batch_select_indices(sample_prompt)

    comp_ids, comp_mask = _completions(input_ids, attention_mask, prompt_lens)
    steps = torch.arange(comp_ids.shape[1], device=comp_ids.device)
    # Text after the prompt continues at the prompt's next M-RoPE position, the same on all three axes.
    comp_pos = (prompt_lens + deltas[sample_prompt, 0])[:, None] + steps[None, :]
    hidden = text(inputs_embeds=embed(comp_ids), position_ids=comp_pos.unsqueeze(0).expand(3, -1, -1),
                  attention_mask=torch.cat([mask[sample_prompt], comp_mask.long()], dim=1),
                  past_key_values=cache, use_cache=True).last_hidden_state
    # The state that predicts completion token t: the prompt's last one for t = 0, then completion token t - 1.
    predicting = torch.cat([prompt.last_hidden_state[sample_prompt, -1:], hidden[:, :-1]], dim=1)
    rows, steps_used = comp_mask.nonzero(as_tuple=True)
    frame = predicting.new_zeros(input_ids.shape[0], input_ids.shape[1] - keep_from, predicting.shape[-1])
    frame[rows, prompt_lens[rows] - 1 - keep_from + steps_used] = predicting[rows, steps_used]
    return hf.lm_head(frame)
