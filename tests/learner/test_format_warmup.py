"""The format warm-up: targets carry no information about the image; a short run teaches the tags."""
import collections
import random

import pytest
import torch

from conftest import WARMUP_PIXELS as PIXELS
from learner.format_warmup import REASONING, format_target, format_text
from medvqa.prompt import load_processor, render_prompt
from medvqa.synthetic import make_synthetic_split
from rewards.rules import extract_answer, format_reward


def test_targets_ignore_the_image_and_spread_the_letters(tiny_model_dir):
    tok = load_processor(tiny_model_dir).tokenizer
    a, b = make_synthetic_split("MRI", "train", 2, seed=0, question_types=["location"], num_options=4)
    assert a.answer != b.answer or a.image != b.image
    letters = collections.Counter()
    for seed in range(400):
        ta, tb = format_target(tok, random.Random(seed), a), format_target(tok, random.Random(seed), b)
        assert ta.ids == tb.ids  # same options, other image and answer: the very same target
        text = tok.decode(ta.ids, skip_special_tokens=True)
        assert format_reward(text) == 1.0 and any(f"<think>{r}</think>" in text for r in REASONING)
        letters[extract_answer(text, a.options)] += 1
    assert sorted(letters) == ["A", "B", "C", "D"] and min(letters.values()) > 70  # 100 expected each
    t = format_target(tok, random.Random(0), a)
    assert [tok.decode([i]) for i in t.letter_ids] == ["A", "B", "C", "D"]
    assert t.ids[t.letter_pos] in t.letter_ids and tok.decode(t.ids[t.letter_pos - 1]) == "<answer>"
    assert t.ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def _sample(model_dir, records, seed=0):
    from transformers import Qwen2VLForConditionalGeneration

    proc = load_processor(model_dir, PIXELS, PIXELS)
    proc.tokenizer.padding_side = "left"
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    inputs = proc(text=[render_prompt(r, proc) for r in records], images=[r.load_image() for r in records],
                  padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=40)
    return proc.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.timeout(900)  # the session's warm-up, when this test is the first to need it
def test_warmup_teaches_the_format_not_the_answer(tiny_model_dir, warm_model_dir):
    """`warm_model_dir` is warmup_format run on tests/conftest.py's warmup_records (MRI)."""
    held_out = (make_synthetic_split("CT", "test", 24, seed=0, question_types=["location"], num_options=2)
                + make_synthetic_split("CT", "test", 24, seed=0, num_options=4))
    before = _sample(tiny_model_dir, held_out)
    assert sum(format_reward(t) for t in before) == 0  # a random model never writes the tags

    texts = _sample(warm_model_dir, held_out)
    answers = [extract_answer(t, r.options) for t, r in zip(texts, held_out)]
    assert sum(format_reward(t) for t in texts) / len(texts) >= 0.8
    assert sum(a is not None for a in answers) / len(answers) >= 0.75
    two = collections.Counter(a for a, r in zip(answers, held_out) if len(r.options) == 2 and a)
    assert set(two) == {"A", "B"} and min(two.values()) >= 0.25 * sum(two.values())
    four = collections.Counter(a for a, r in zip(answers, held_out) if len(r.options) == 4 and a)
    assert len(four) >= 3  # the letters spread over the options
    correct = sum(a == r.answer for a, r in zip(answers, held_out))
    assert correct <= 0.6 * len(held_out)  # no better than chance (about 0.38 expected)
    assert format_text("x", "B") == "<think>x</think><answer>B</answer>"
