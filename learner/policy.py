"""The forward pass the learner trains: image features once per prompt, logits on completions only.

`PolicyModule` wraps a Hugging Face Qwen2-VL model so that DeepSpeed's engine runs the whole pass
(its ZeRO-3 parameter fetches and backward hooks hang on the engine's forward). Two departures
from calling the HF model with `pixel_values`:
- the vision tower runs once per distinct prompt and its features are shared by the G samples
  (or come precomputed, when the tower is frozen, for every pass of a step);
- image features go where `mm_token_type_ids` marks the prompt's placeholders, not wherever the
  image token id occurs: a sampled completion may contain `<|image_pad|>` as a plain token, and the
  engine embedded it as text there.
With `share_prompts` each distinct prompt also goes through the language model only once, its samples'
completions continuing from its cache (learner/shared_prompt.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from learner.model_inputs import SampleBatch
from learner.shared_prompt import shared_prompt_logits


class PolicyModule(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                mm_token_type_ids: Optional[torch.Tensor] = None, sample_grid_thw: Optional[torch.Tensor] = None,
                sample_prompt: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None,
                keep_from: int = 0, prompt_lens: Optional[torch.Tensor] = None,
                share_prompts: bool = False) -> torch.Tensor:
        """Logits (B, L - keep_from, V) for positions keep_from..L-1; with no input_ids, image features.

        `image_embeds` (distinct prompts' features, concatenated) replaces `pixel_values` when given.
        """
        if input_ids is None:
            return self._image_features(pixel_values, image_grid_thw)
        if image_embeds is None:
            image_embeds = self._image_features(pixel_values, image_grid_thw)
        if share_prompts:
            return shared_prompt_logits(self.hf, input_ids, attention_mask, mm_token_type_ids, sample_prompt,
                                        image_embeds, image_grid_thw, prompt_lens, keep_from)
        per_prompt = torch.split(image_embeds, _tokens_per_image(self.hf, image_grid_thw))
        sample_feats = torch.cat([per_prompt[int(p)] for p in sample_prompt])
        embeds = self.hf.get_input_embeddings()(input_ids)
        image_mask = (mm_token_type_ids == 1).unsqueeze(-1).expand_as(embeds)
        if int(image_mask[..., 0].sum()) != sample_feats.shape[0]:
            raise ValueError(f"{int(image_mask[..., 0].sum())} image placeholder tokens but "
                             f"{sample_feats.shape[0]} image feature rows")
        embeds = embeds.masked_scatter(image_mask, sample_feats.to(embeds.dtype))
        out = self.hf(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                      mm_token_type_ids=mm_token_type_ids, image_grid_thw=sample_grid_thw,
                      use_cache=False, logits_to_keep=input_ids.shape[1] - keep_from)
        return out.logits

    def _image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        out = self.hf.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        return torch.cat(list(out.pooler_output))


def _tokens_per_image(hf_model: nn.Module, image_grid_thw: torch.Tensor) -> list[int]:
    merge = hf_model.config.vision_config.spatial_merge_size
    return (image_grid_thw.prod(-1) // merge**2).tolist()


def batch_kwargs(batch: SampleBatch, image_embeds: Optional[torch.Tensor], device,
                 share_prompts: bool = False) -> dict:
    """The keyword arguments of `PolicyModule.forward` for a collated batch, on `device`.

    Logits are kept from the shortest prompt's last token on: nothing before it predicts a
    completion token, and the full (L, vocab) logits are the largest tensor of the pass.
    """
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              mm_token_type_ids=batch.mm_token_type_ids, sample_grid_thw=batch.sample_grid_thw,
              sample_prompt=batch.sample_prompt, image_grid_thw=batch.image_grid_thw, prompt_lens=batch.prompt_lens)
    if image_embeds is None:
        kw["pixel_values"] = batch.pixel_values
    else:
        kw["image_embeds"] = image_embeds
    kw = {k: v.to(device) for k, v in kw.items()}
    kw["keep_from"] = batch.min_prompt_len - 1
    kw["share_prompts"] = share_prompts
    return kw
