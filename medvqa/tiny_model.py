"""A tiny random Qwen2-VL checkpoint built offline in seconds: the model every test and the CPU demo run.

The tokenizer is a byte-level BPE trained on the spot on the task's own text (the prompt template,
the synthetic questions and options, letters, digits), so prompts tokenise compactly; it carries
Qwen2-VL's special tokens so that the processor and vLLM find them where they look for them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from medvqa.prompt import INSTRUCTION
from medvqa.synthetic import COUNT_VALUES, GRID3, HALVES, QUADRANTS, QUESTION_TYPES, question_for
from protocol.choices import LETTERS

# Qwen2-VL's special tokens in the order (and so the relative ids) of the real tokenizer.
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Single tokens, but not "special": decoding with skip_special_tokens must keep them, since the
# rewards read them from the decoded text.
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL-Instruct's chat template (its video numbering left out: the task has no videos).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words the tokenizer should know whole: the synthetic task, then common medical-VQA words so that
# public data sets also tokenise tolerably.
_TASK_WORDS = (
    "left right upper lower top bottom middle center centre side half quadrant region part "
    "upper left, upper right, lower left, lower right, middle left, middle right, upper center, lower center "
    "none one two three four five six seven eight nine ten "
    "MRI CT X-ray scan image brain chest lung liver kidney heart bone spine abdomen head neck "
    "lesion lesions tumor tumour mass nodule bright dark brighter darker brightest darkest "
    "normal abnormal finding findings modality organ shown visible appears most likely diagnosis "
    "Computed Tomography Magnetic Resonance Imaging ultrasound fundus microscopy dermoscopy "
    "What which where how many is are the a an of in on this that image shows question answer "
)
_COMPLETIONS = (
    "<think>The lesion is on the left side of the scan.</think>\n<answer>A</answer>",
    "<think>There are two bright lesions, so the answer is B.</think>\n<answer>B</answer>",
    "<think>The right half is brighter than the left half.</think>\n<answer>C</answer>",
    "<think>The lesion lies in the lower right quadrant.</think>\n<answer>D</answer>",
)


def tokenizer_corpus() -> list[str]:
    """The text the BPE is trained on; repeated lines make their frequent words single tokens."""
    letters = [f"<answer>{c}</answer>" for c in LETTERS]
    digits = [" ".join(str(i) for i in range(100))]
    chat = [f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n", "<|im_start|>assistant\n"]
    questions = [question_for(t, layout) for t in QUESTION_TYPES for layout in (HALVES, QUADRANTS, GRID3)]
    options = [f"{c}) {v}" for c, v in zip(LETTERS * 2, GRID3.names + COUNT_VALUES)]
    lines = ([INSTRUCTION] * 20 + questions * 10 + options * 10 + [_TASK_WORDS] * 10
             + list(_COMPLETIONS) * 5 + letters * 5 + digits + chat * 5)
    # Added tokens never reach the BPE model, so merges learnt on their pieces would be wasted.
    for tok in QWEN2_VL_SPECIAL_TOKENS + REASONING_TOKENS:
        lines = [line.replace(tok, " ") for line in lines]
    return lines


def train_tokenizer(vocab_size: int = 1024):
    """A Qwen2TokenizerFast whose byte-level BPE is trained on `tokenizer_corpus()`.

    The trained vocabulary does not depend on any seed: every tiny model shares one tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    from tokenizers import Regex

    # The same pre-tokenizer as Qwen2's, so the merges fit the splits the final tokenizer makes.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(model["vocab"])
    # Fixed ids right after the BPE vocabulary, in Qwen2-VL's order, before the tokenizer adds any.
    for token in QWEN2_VL_SPECIAL_TOKENS + REASONING_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2TokenizerFast(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS[1:]), model_max_length=32768,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    return tok


# vLLM's CPU attention kernels need head_dim 64 (16 is rejected): the text model has hidden / 64 heads.
HEAD_DIM = 64


def tiny_config(tokenizer, hidden: int = 128, layers: int = 2, intermediate: Optional[int] = None):
    """A Qwen2VLConfig of a few MB by default (hidden 128, 2 layers, so 2 heads; MLP of twice the hidden
    size unless `intermediate` says otherwise); larger sizes are for benchmarks. The vision tower stays
    tiny; its merger projects into `hidden`."""
    from transformers import Qwen2VLConfig

    if hidden < HEAD_DIM or hidden % HEAD_DIM:
        raise ValueError(f"hidden size {hidden} must be a positive multiple of {HEAD_DIM} (the CPU attention head size)")
    if layers < 1:
        raise ValueError(f"the model needs at least one layer, got {layers}")
    heads = hidden // HEAD_DIM
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        # M-RoPE splits head_dim/2 = 32 rotary frequencies over (time, height, width).
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False, dtype="float32",
    )
    vision = dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=2, mlp_ratio=2, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def tiny_processor(tokenizer, min_pixels: int = 56 * 56, max_pixels: int = 512 * 28 * 28):
    """Qwen2-VL's image and video processors with the tokenizer and chat template above."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video = Qwen2VLVideoProcessor(cap_pixels_per_frame=True)
    return Qwen2VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=CHAT_TEMPLATE)


def build_tiny_model(out_dir: str, seed: int = 0, hidden: int = 128, layers: int = 2,
                     intermediate: Optional[int] = None) -> str:
    """Write a random tiny Qwen2-VL checkpoint (safetensors, processor, tokenizer) to `out_dir`
    (its text model sized by `hidden`, `layers` and `intermediate`, see `tiny_config`).

    The same seed gives byte-identical weights; the tokenizer is the same for every seed and size.
    Returns `out_dir`.
    """
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = tiny_config(tokenizer, hidden, layers, intermediate)
    # A private generator leaves the caller's global RNG streams untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id, pad_token_id=config.text_config.pad_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.bos_token_id],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tiny_processor(tokenizer).save_pretrained(out)
    return str(out)
