"""Writing a policy as a Hugging Face checkpoint folder that transformers and vLLM both load."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

# Files of a checkpoint folder that belong to the model itself; the rest (tokenizer, processor,
# chat template) are copied as they are.
_MODEL_FILES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def save_hf_checkpoint(hf_model, out_dir: str, source_path: str,
                       state_dict: Optional[dict[str, torch.Tensor]] = None) -> str:
    """Model weights and config (from `state_dict` when given) plus the processor files of
    `source_path`, the checkpoint the policy started from. Returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    copy_processor_files(source_path, out)
    return str(out)


def copy_processor_files(source_path: str, out: Path) -> None:
    src = Path(source_path)
    if not src.is_dir():  # a hub id: the processor as published
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(source_path).save_pretrained(out)
        return
    for f in src.iterdir():
        if f.is_file() and f.name not in _MODEL_FILES and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
