"""The MedVLM-R1 prompt through the tiny model's processor, and the learner's batched processor inputs."""
import numpy as np
import pytest
from PIL import Image

from medvqa.prompt import INSTRUCTION, chat_messages, load_processor, processor_inputs, question_text, render_prompt
from medvqa.record import MedVQARecord


def _record(rid: str = "r1", size: int = 56, seed: int = 0) -> MedVQARecord:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return MedVQARecord(id=rid, image=image, question="Which organ is shown?",
                        options={"A": "brain", "B": "liver", "C": "lung"}, answer="C", modality="CT")


def test_question_text_is_the_papers_prompt():
    text = question_text(_record())
    assert text == (
        "Which organ is shown?\nA) brain\nB) liver\nC) lung\nYour task:\n"
        "1. Think through the question step by step, enclose your reasoning process in <think>...</think> tags.\n"
        "2. Then provide the correct single-letter choice (A, B, C, D,...) inside <answer>...</answer> tags.\n"
        "3. No extra information or text outside of these tags."
    )
    assert text.endswith(INSTRUCTION)
    msgs = chat_messages(_record())
    assert [m["role"] for m in msgs] == ["user"]
    assert [c["type"] for c in msgs[0]["content"]] == ["image", "text"]
    assert msgs[0]["content"][1]["text"] == text


def test_render_prompt_through_chat_template(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    prompt = render_prompt(_record(), processor)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>" + question_text(_record()) + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The trained tokenizer keeps the whole prompt short: the tiny CPU run pays for every token.
    assert len(processor.tokenizer(prompt)["input_ids"]) < 110


def test_processor_inputs_left_padded_batch(tiny_model_dir):
    processor = load_processor(tiny_model_dir, min_pixels=56 * 56, max_pixels=512 * 28 * 28)
    records = [_record("small", 56), _record("large", 84, seed=1)]
    out = processor_inputs(records, processor)
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 6]]
    # One row per 14x14 patch, two frames of 3 channels each.
    assert tuple(out["pixel_values"].shape) == (16 + 36, 3 * 2 * 14 * 14)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (out["input_ids"] == image_pad).sum(dim=1).tolist() == [4, 9]
    assert out["mm_token_type_ids"].tolist() == (out["input_ids"] == image_pad).long().tolist()
    mask = out["attention_mask"]
    assert mask[0, :5].sum() == 0 and mask[:, -1].tolist() == [1, 1]  # the short prompt is padded on the left
    assert mask.sum(dim=1).tolist()[1] - mask.sum(dim=1).tolist()[0] == 5
    for row, rec in enumerate(records):
        single = processor(text=[render_prompt(rec, processor)], images=[rec.load_image()], return_tensors="pt")
        assert out["input_ids"][row][mask[row].bool()].tolist() == single["input_ids"][0].tolist()
    assert processor.tokenizer.padding_side == "right"  # restored for other callers


def test_pixel_bounds_resize_images(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    small_cap = processor_inputs([_record("large", 84)], processor, min_pixels=28 * 28, max_pixels=56 * 56)
    assert small_cap["image_grid_thw"].tolist() == [[1, 4, 4]]
    upscale = processor_inputs([_record("small", 56)], processor, min_pixels=112 * 112, max_pixels=512 * 28 * 28)
    assert upscale["image_grid_thw"].tolist() == [[1, 8, 8]]
    loaded = load_processor(tiny_model_dir, min_pixels=112 * 112, max_pixels=200 * 200)
    assert loaded.image_processor.size["shortest_edge"] == 112 * 112
    assert loaded.image_processor.size["longest_edge"] == 200 * 200


def test_bad_inputs_raise_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(OSError, match="no-such-model"):
        load_processor(str(tmp_path / "no-such-model"))
    processor = load_processor(tiny_model_dir)
    with pytest.raises(ValueError, match="at least one record"):
        processor_inputs([], processor)
    with pytest.raises(ValueError, match="min_pixels"):
        processor_inputs([_record()], processor, min_pixels=10_000, max_pixels=5_000)
