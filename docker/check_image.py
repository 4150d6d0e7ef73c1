"""Run by docker/Dockerfile right after the dependencies are installed, and at no other time: fail the
build, not the first run, when the environment cannot run the GPU profile.

Checked without a GPU (an image builds on machines without one):
- torch is a CUDA build, of the same CUDA major version as the base image (CUDA_VERSION, set by the
  nvidia/cuda images), so the image's driver requirement is the wheels' own;
- every heavy import the run makes works, torchaudio and torchcodec included: vLLM requires them,
  and they are CUDA builds that load only against a CUDA torch;
- vLLM's NCCL wrapper loads libnccl, without which its weight-sync communicator is silently disabled.
"""
from __future__ import annotations

import importlib
import os
import sys

IMPORTS = ("torch", "torchvision", "torchaudio", "torchcodec", "transformers", "vllm", "deepspeed", "ray")


def check_cuda_build(base_cuda: str) -> str:
    """The problem with torch's build against the base image's CUDA version, or '' when there is none."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; the gpu extra must pull the CUDA wheel"
    if torch.version.cuda.split(".")[0] != base_cuda.split(".")[0]:
        return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, the base image is CUDA "
                f"{base_cuda}: pick a base image of the wheels' CUDA major version")
    return ""


def check_imports() -> list[str]:
    problems = []
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as exc:
            problems.append(f"import {name} failed: {type(exc).__name__}: {exc}")
    try:
        from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor  # noqa: F401
    except Exception as exc:
        problems.append(f"transformers cannot import Qwen2-VL: {type(exc).__name__}: {exc}")
    return problems


def check_nccl() -> str:
    try:
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

        NCCLLibrary()
    except Exception as exc:
        return f"vLLM cannot load libnccl (its weight-sync communicator would be disabled): {exc}"
    return ""


def main() -> int:
    base = os.environ.get("CUDA_VERSION")
    if not base:
        print("check_image: CUDA_VERSION is not set; run this inside an nvidia/cuda image", file=sys.stderr)
        return 1
    problems = [p for p in [check_cuda_build(base), *check_imports(), check_nccl()] if p]
    for p in problems:
        print(f"check_image: {p}", file=sys.stderr)
    if not problems:
        print(f"check_image: CUDA {base} base, torch CUDA build, imports and libnccl all fine")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
