"""`make-tiny-model --like qwen2-vl-2b`: Qwen2-VL-2B-Instruct's published config with random weights (here
cut to 2 text layers and 2 vision blocks): the config field for field, the parameter count worked out by
hand, a tied head on disk and after loading, and token ids at the published places."""
import json

import numpy as np
import pytest
from PIL import Image

from medvqa.tiny_model import QWEN2_VL_2B_INSTRUCT_CONFIG as PUBLISHED
from medvqa.tiny_model import REAL_SHAPE_DIFFERENCES, parameter_count, real_shape_config

LAYERS, VISION_DEPTH = 2, 2
FULL_COUNT = 2_208_985_600  # Qwen2-VL-2B at 28 layers and 32 vision blocks, the tied head counted once
# Fields of the flat published file that transformers 5.19 keeps at the top of config.json; the other
# flat fields belong to the text model and move into text_config.
TOP_LEVEL = {"architectures", "model_type", "transformers_version", "tie_word_embeddings", "vision_config",
             "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id"}


@pytest.fixture(scope="module")
def real_shape_dir(tmp_path_factory):
    """Built once for the module, through the command line (about 15 s, ~800 MB on disk)."""
    from launcher.cli import main

    out = tmp_path_factory.mktemp("real_shape") / "qwen2-vl-2b-2x2"
    assert main(["make-tiny-model", str(out), "--like", "qwen2-vl-2b", "--layers", str(LAYERS),
                 "--vision-depth", str(VISION_DEPTH)]) == 0
    return out


def _written(saved: dict, key: str):
    """The value transformers 5.19 wrote for a field of the flat published config."""
    text = saved["text_config"]
    if key == "torch_dtype":
        assert text["dtype"] == saved["dtype"]
        return saved["dtype"]
    if key == "rope_theta":
        return text["rope_parameters"]["rope_theta"]
    if key == "rope_scaling":  # merged into rope_parameters, next to rope_theta and rope_type
        return {k: text["rope_parameters"][k] for k in PUBLISHED["rope_scaling"]}
    return saved[key] if key in TOP_LEVEL else text[key]


def test_config_is_the_published_one_but_for_the_depths(real_shape_dir):
    import transformers

    saved = json.loads((real_shape_dir / "config.json").read_text())
    # No text field left at the top as well: a second copy that readers might take for the first.
    assert set(saved) - TOP_LEVEL == {"text_config", "dtype"}
    differ = {key: _written(saved, key) for key, value in PUBLISHED.items()
              if key != "vision_config" and _written(saved, key) != value}
    differ.update({f"vision_config.{key}": saved["vision_config"][key]
                   for key, value in PUBLISHED["vision_config"].items() if saved["vision_config"][key] != value})
    assert differ == {"num_hidden_layers": LAYERS, "vision_config.depth": VISION_DEPTH,
                      "transformers_version": transformers.__version__}
    assert set(differ) == set(REAL_SHAPE_DIFFERENCES)
    assert saved["text_config"]["layer_types"] == ["full_attention"] * LAYERS
    assert saved["tie_word_embeddings"] is True and saved["dtype"] == "bfloat16"
    assert saved["text_config"]["rope_parameters"]["mrope_section"] == [16, 24, 24]
    assert saved["text_config"]["sliding_window"] == 32768 and saved["text_config"]["use_sliding_window"] is False


def _hand_count(layers: int, blocks: int) -> int:
    """Qwen2-VL-2B's parameters with `layers` text layers and `blocks` vision blocks, from its widths."""
    hidden, intermediate, heads, kv_heads, vocab = 1536, 8960, 12, 2, 151936
    kv = kv_heads * (hidden // heads)  # 2 heads of 128
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden  # q, k, v biased; o not
    decoder_layer = attention + 3 * hidden * intermediate + 2 * hidden  # gate, up, down; two RMSNorm weights
    text = vocab * hidden + layers * decoder_layer + hidden  # one embedding for input and head; final norm
    embed, mlp = 1280, 4 * 1280
    block = 2 * 2 * embed + (embed * 3 * embed + 3 * embed) + (embed * embed + embed) \
        + (embed * mlp + mlp) + (mlp * embed + embed)  # two LayerNorms, qkv, proj, fc1, fc2, all biased
    patch_embed = 3 * 2 * 14 * 14 * embed  # Conv3d over 2 frames of 14x14 RGB patches, no bias
    merged = 4 * embed  # 2x2 patches concatenated
    merger = 2 * embed + (merged * merged + merged) + (merged * hidden + hidden)
    return text + patch_embed + blocks * block + merger


def test_parameter_count_on_the_meta_device():
    assert _hand_count(28, 32) == FULL_COUNT
    assert parameter_count(real_shape_config()) == FULL_COUNT
    assert _hand_count(LAYERS, VISION_DEPTH) == 401_918_976
    assert parameter_count(real_shape_config(layers=LAYERS, vision_depth=VISION_DEPTH)) == 401_918_976


def test_checkpoint_has_one_embedding_and_loads_tied_in_float32(real_shape_dir):
    import torch
    from safetensors import safe_open
    from transformers import Qwen2VLForConditionalGeneration

    with safe_open(str(real_shape_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        on_disk = sum(int(np.prod(f.get_slice(n).get_shape())) for n in names)
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert not any("lm_head" in n for n in names)
    assert on_disk == _hand_count(LAYERS, VISION_DEPTH)
    model = Qwen2VLForConditionalGeneration.from_pretrained(real_shape_dir, dtype=torch.float32)
    embed = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == embed.data_ptr() and embed.dtype == torch.float32
    assert tuple(embed.shape) == (151936, 1536)
    assert (len(model.model.language_model.layers), len(model.model.visual.blocks)) == (LAYERS, VISION_DEPTH)


def test_processor_and_tokenizer_use_the_published_ids(real_shape_dir):
    from transformers import AutoProcessor

    from medvqa.tiny_model import QWEN2_VL_SPECIAL_TOKENS, REASONING_TOKENS

    processor = AutoProcessor.from_pretrained(real_shape_dir)
    tok = processor.tokenizer
    # Qwen2-VL's 14 special tokens at 151643..151656 as published; the tags on the free ids after them.
    assert [tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS + REASONING_TOKENS] \
        == list(range(151643, 151661))
    assert processor.image_processor.size["longest_edge"] == 401408
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the lesion?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    # smart_resize rounds each side to a multiple of 28 (14-px patches merged 2x2): 512/28 = 18.3 -> 18,
    # 504 px, inside max_pixels (504^2 = 254,016 <= 401,408); 36x36 patches, 18x18 = 324 merged tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 36, 36]]
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(151655) == 324
    assert ids.count(151652) == ids.count(151653) == 1 and ids.count(151644) == 3  # system, user, assistant
    completion = tok("<think>x</think><answer>B</answer>")["input_ids"]
    assert [i for i in completion if i >= 151643] == [151657, 151658, 151659, 151660]
    assert max(ids + completion) < 151936


def test_like_refuses_widths_and_unknown_names(tmp_path, capsys):
    from launcher.cli import main

    assert main(["make-tiny-model", str(tmp_path / "a"), "--like", "qwen2-vl-2b", "--hidden", "256"]) == 2
    assert "--like fixes the widths" in capsys.readouterr().err
    assert main(["make-tiny-model", str(tmp_path / "b"), "--vision-depth", "2"]) == 2
    assert "--vision-depth goes with --like" in capsys.readouterr().err
    assert main(["make-tiny-model", str(tmp_path / "c"), "--like", "qwen2-vl-7b"]) == 2
    assert "no published config 'qwen2-vl-7b'; known: qwen2-vl-2b" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
