"""What the GPU profile needs from the installed torch, checked where each process starts.

`torch==2.13.0` is also satisfied by `2.13.0+cpu`, and pip prefers that wheel whenever one is in
reach (a local wheel folder, a CPU index), so a GPU install can end up with CPU torch beside CUDA
vLLM. Nothing fails until much later (an engine that finds no CUDA platform, NCCL that cannot load),
so the run checks at start-up instead, in the driver and in every actor.
"""
from __future__ import annotations

import os

GPU_INSTALL_HINT = ("install the GPU profile with pip install -e '.[gpu]' (its torch pin excludes 2.13.0+cpu), "
                    "or run the CPU profile with cluster.device=cpu")


class ProfileError(RuntimeError):
    """The installed stack cannot run the configured profile; the message says what to install."""


def check_torch_for(device: str, where: str, need_gpu: bool = False) -> None:
    """Raise ProfileError when `device` is gpu and torch is a CPU-only build, or (`need_gpu`: in an
    actor that holds GPUs) when torch sees no GPU. The driver passes need_gpu=False: it may run on a
    node without GPUs."""
    if device != "gpu":
        return
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise ProfileError(f"{where}: cluster.device=gpu, but torch {torch.__version__} is a CPU-only build "
                           f"(torch.version.cuda is None); {GPU_INSTALL_HINT}")
    if need_gpu and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise ProfileError(f"{where}: cluster.device=gpu, but torch {torch.__version__} (CUDA {torch.version.cuda}) "
                           f"sees no GPU (CUDA_VISIBLE_DEVICES={visible}); check the NVIDIA driver with nvidia-smi "
                           "and that Ray gave this actor a GPU")
