"""Random Qwen2-VL checkpoints built offline: the tiny one every test and the CPU demo run (a few MB, in
seconds), and one with Qwen2-VL-2B-Instruct's published config, its depths optionally cut.

The tokenizer is a byte-level BPE trained on the spot on the task's own text (the prompt template,
the synthetic questions and options, letters, digits), so prompts tokenise compactly; it carries
Qwen2-VL's special tokens so that the processor and vLLM find them where they look for them.
"""
from __future__ import annotations

import copy
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


def train_tokenizer(vocab_size: int = 1024, first_special_id: Optional[int] = None):
    """A Qwen2TokenizerFast whose byte-level BPE is trained on `tokenizer_corpus()`.

    The special tokens, then the reasoning tags, take consecutive ids from `first_special_id`
    (default: right after the BPE vocabulary); ids in between are left unused.
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
    first = len(vocab) if first_special_id is None else first_special_id
    if first < len(vocab):
        raise ValueError(f"special tokens from id {first} would overlap the {len(vocab)} BPE tokens")
    # Fixed ids in Qwen2-VL's order, in the model's vocabulary before the tokenizer adds any: added
    # tokens it already knows keep their ids, whatever gaps lie below them.
    for i, token in enumerate(QWEN2_VL_SPECIAL_TOKENS + REASONING_TOKENS):
        vocab[token] = first + i
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


def tiny_config(tokenizer, hidden: int = 128, layers: int = 2, intermediate: Optional[int] = None,
                vocab_size: Optional[int] = None, kv_heads: Optional[int] = None, tie: bool = False):
    """A Qwen2VLConfig of a few MB by default (hidden 128, 2 layers, so 2 heads; MLP of twice the hidden
    size unless `intermediate` says otherwise); larger sizes are for benchmarks. The vision tower stays
    tiny; its merger projects into `hidden`. `vocab_size` (default: the tokenizer's), `kv_heads` (default:
    as many as query heads) and `tie` (one tensor for the token embedding and the output head) give the
    published model's structure at a small width."""
    from transformers import Qwen2VLConfig

    if hidden < HEAD_DIM or hidden % HEAD_DIM:
        raise ValueError(f"hidden size {hidden} must be a positive multiple of {HEAD_DIM} (the CPU attention head size)")
    if layers < 1:
        raise ValueError(f"the model needs at least one layer, got {layers}")
    heads = hidden // HEAD_DIM
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not share {kv_heads} key/value heads evenly")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    text = dict(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
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
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie,
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

    tokenizer = train_tokenizer()
    config = tiny_config(tokenizer, hidden, layers, intermediate)
    return _save_random_model(out_dir, config, tokenizer, seed, torch.float32)


def _save_random_model(out_dir: str, config, tokenizer, seed: int, dtype) -> str:
    """Initialise `config`'s model from `seed`, cast it to `dtype`, save it with its processor."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A private generator leaves the caller's global RNG streams untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).to(dtype).eval()
    text = config.text_config
    # The published pad id where the config has none (Qwen2-VL's own generation_config.json does so).
    pad = text.pad_token_id if text.pad_token_id is not None else text.bos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, pad_token_id=pad, eos_token_id=[text.eos_token_id, text.bos_token_id],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tiny_processor(tokenizer).save_pretrained(out)
    return str(out)


# Qwen2-VL-2B-Instruct's config.json as published on the Hugging Face hub (flat, transformers 4.41's
# layout). transformers 5.19 reads it into text_config / vision_config, rope_theta and rope_scaling into
# text_config.rope_parameters, torch_dtype into dtype, and adds its own defaults for absent fields.
QWEN2_VL_2B_INSTRUCT_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 1536,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}
# `make-tiny-model --like NAME`: the published configs a real-shape model copies.
PUBLISHED_CONFIGS = {"qwen2-vl-2b": QWEN2_VL_2B_INSTRUCT_CONFIG}
# Published fields whose written value differs, and why. Nothing else differs: the model's layout in
# transformers 5.19 is the one the published checkpoint loads into.
REAL_SHAPE_DIFFERENCES = {
    "num_hidden_layers": "the text layers asked for (published: 28); text_config.layer_types follows it",
    "vision_config.depth": "the vision blocks asked for (published: 32)",
    "transformers_version": "the version that wrote the file, not the publisher's",
}


def real_shape_config(like: str = "qwen2-vl-2b", layers: Optional[int] = None, vision_depth: Optional[int] = None):
    """The Qwen2VLConfig of the published config `like`, with `layers` text layers and `vision_depth`
    vision blocks where given (default: the published depths)."""
    from transformers import Qwen2VLConfig

    if like not in PUBLISHED_CONFIGS:
        raise ValueError(f"no published config {like!r}; known: {', '.join(sorted(PUBLISHED_CONFIGS))}")
    published = copy.deepcopy(PUBLISHED_CONFIGS[like])
    for name, depth in (("text layers", layers), ("vision blocks", vision_depth)):
        if depth is not None and depth < 1:
            raise ValueError(f"the model needs at least one of its {name}, got {depth}")
    published["num_hidden_layers"] = layers or published["num_hidden_layers"]
    published["vision_config"]["depth"] = vision_depth or published["vision_config"]["depth"]
    # A class attribute and the writer's version, not arguments; layer_types, were it there, would keep
    # the published depth: without it transformers derives one entry per layer.
    for key in ("model_type", "transformers_version", "layer_types"):
        published.pop(key, None)
    config = Qwen2VLConfig(**published)
    # transformers nulls sliding_window while use_sliding_window is false (it does so again on loading);
    # the file keeps the published value, so that it reads as the published one.
    config.text_config.sliding_window = published["sliding_window"]
    return config


def parameter_count(config) -> int:
    """Parameters of `config`'s model, a tied embedding counted once; built on the meta device, so
    nothing is allocated."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


def build_real_shape_model(out_dir: str, like: str = "qwen2-vl-2b", layers: Optional[int] = None,
                           vision_depth: Optional[int] = None, seed: int = 0) -> str:
    """Write a random checkpoint with the published config `like` (depths cut by `layers` and
    `vision_depth`), the tiny model's tokenizer with its special tokens at the published ids, and the
    tiny model's processor. Weights are saved in the published dtype (bfloat16); load them in float32
    with `dtype=torch.float32`. Returns `out_dir`.
    """
    config = real_shape_config(like, layers, vision_depth)
    # Qwen2's special tokens are consecutive from <|endoftext|>, the published bos token.
    tokenizer = train_tokenizer(first_special_id=config.text_config.bos_token_id)
    _check_token_ids(tokenizer, config)
    return _save_random_model(out_dir, config, tokenizer, seed, config.text_config.dtype)


def _check_token_ids(tokenizer, config) -> None:
    """The tokenizer's special tokens sit at the config's ids, and no id reaches past the embedding."""
    expected = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
                "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id,
                "<|endoftext|>": config.text_config.bos_token_id, "<|im_end|>": config.text_config.eos_token_id}
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in expected}
    if got != expected:
        raise ValueError(f"tokenizer ids {got} differ from the config's {expected}")
    top = max(tokenizer.get_vocab().values())
    if top >= config.text_config.vocab_size:
        raise ValueError(f"token id {top} is past the embedding's {config.text_config.vocab_size} rows")


def build_tied_model(out_dir: str, seed: int = 0, hidden: int = 256, layers: int = 2) -> str:
    """The published model's structure at a width a test can afford: the token embedding and the output
    head tied, all 151,936 vocabulary rows with the special tokens at their published ids, 2 key/value
    heads shared by hidden / 64 query heads, mRoPE, in float32. Returns `out_dir`."""
    import torch

    published = QWEN2_VL_2B_INSTRUCT_CONFIG
    tokenizer = train_tokenizer(first_special_id=published["bos_token_id"])
    config = tiny_config(tokenizer, hidden, layers, vocab_size=published["vocab_size"],
                         kv_heads=published["num_key_value_heads"], tie=True)
    _check_token_ids(tokenizer, config)
    return _save_random_model(out_dir, config, tokenizer, seed, torch.float32)
