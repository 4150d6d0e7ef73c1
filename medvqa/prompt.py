"""The MedVLM-R1 prompt: one user turn holding the image, then the question, its options and the task text."""
from __future__ import annotations

from typing import Optional, Sequence

from medvqa.record import MedVQARecord

# Word for word the instruction of the paper's public code (see PAPER.md); the format and accuracy
# rewards are written against the tags it asks for.
INSTRUCTION = (
    "Your task:\n"
    "1. Think through the question step by step, enclose your reasoning process in <think>...</think> tags.\n"
    "2. Then provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags.\n"
    "3. No extra information or text outside of these tags."
)


def question_text(record: MedVQARecord) -> str:
    """The question, its options as `A) text` lines, then the instruction."""
    return f"{record.question}\n{record.option_lines()}\n{INSTRUCTION}"


def chat_messages(record: MedVQARecord) -> list[dict]:
    """One user turn, image first: the order the paper used and the chat template expects."""
    return [{
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": question_text(record)}],
    }]


def render_prompt(record: MedVQARecord, processor) -> str:
    """The prompt text as the model sees it, with one image placeholder and the assistant turn opened."""
    return processor.apply_chat_template(chat_messages(record), tokenize=False, add_generation_prompt=True)


def set_pixel_bounds(processor, min_pixels: int, max_pixels: int) -> None:
    """Bound the image area the processor resizes to; both are in pixels, as in the config."""
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels {min_pixels} exceeds max_pixels {max_pixels}")
    # transformers 5 reads the bounds from `size` only; the old min_pixels/max_pixels attributes
    # would be passed on as deprecated call arguments.
    processor.image_processor.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}


def vllm_processor_kwargs(min_pixels: int, max_pixels: int) -> dict:
    """`mm_processor_kwargs` for vLLM so that its processor resizes images as `processor_inputs` does.

    The `size` form, not min_pixels/max_pixels, which transformers 5 deprecates.
    """
    return {"size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}}


def load_processor(model_path: str, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
    """The checkpoint's processor, with the image size bounds set where given."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load a processor from {model_path}: {exc}") from exc
    _update_pixel_bounds(processor, min_pixels, max_pixels)
    return processor


def _update_pixel_bounds(processor, min_pixels: Optional[int], max_pixels: Optional[int]) -> None:
    """Set whichever bound is given, keeping the processor's current value for the other."""
    if min_pixels is None and max_pixels is None:
        return
    size = processor.image_processor.size
    lo = min_pixels if min_pixels is not None else size["shortest_edge"]
    hi = max_pixels if max_pixels is not None else size["longest_edge"]
    set_pixel_bounds(processor, lo, hi)


def processor_inputs(records: Sequence[MedVQARecord], processor, min_pixels: Optional[int] = None,
                     max_pixels: Optional[int] = None) -> dict:
    """Tensors for a list of prompts: input_ids, attention_mask (left-padded), mm_token_type_ids,
    pixel_values, image_grid_thw.

    Left padding keeps every prompt's last token at the end, where generation and the learner's
    completion tokens continue it. transformers 5 Qwen2-VL refuses image inputs without
    mm_token_type_ids (1 on image tokens, 0 elsewhere): it computes the M-RoPE positions from them,
    so a caller that appends completion tokens must extend it with zeros.
    """
    if not records:
        raise ValueError("processor_inputs needs at least one record")
    _update_pixel_bounds(processor, min_pixels, max_pixels)
    texts = [render_prompt(r, processor) for r in records]
    images = [r.load_image() for r in records]
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        out = processor(text=texts, images=images, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    return {k: out[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
