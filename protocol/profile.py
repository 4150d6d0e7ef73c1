"""What the GPU profile needs from the installed torch, checked where each process starts.

`torch==2.13.0` is also satisfied by `2.13.0+cpu`, and pip prefers that wheel whenever one is in
reach (a local wheel folder, a CPU index), so a GPU install can end up with CPU torch beside CUDA
vLLM. Nothing fails until much later (an engine that finds no CUDA platform, NCCL that cannot load),
so the run checks at start-up instead, in the driver and in every actor.
"""
from __future__ import annotations

import os
import subprocess
from typing import Optional

GPU_INSTALL_HINT = ("install the GPU profile with make setup-gpu (into .venv-gpu; or pip install -e '.[gpu]': its "
                    "torch pin excludes 2.13.0+cpu), or run the CPU profile with cluster.device=cpu")
# The gpu extra's wheels (torch 2.13, its NCCL, vLLM 0.32) are CUDA 13.0 builds, which need this driver.
MIN_NVIDIA_DRIVER = 580


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


def nvidia_driver_version() -> Optional[str]:
    """The NVIDIA driver's version as nvidia-smi reports it (e.g. "580.65.06"), None without a driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def check_gpu_node(where: str) -> str:
    """What a GPU run needs on this node, before anything starts: a CUDA torch, a GPU it sees, and a driver
    new enough for the wheels. Raises ProfileError naming the first thing missing; returns a summary."""
    import torch

    check_torch_for("gpu", where)
    driver = nvidia_driver_version()
    if driver is None:
        raise ProfileError(f"{where}: cluster.device=gpu, but nvidia-smi finds no NVIDIA driver on this node; "
                           "run on a GPU node (sbatch --gpus-per-node) or with cluster.device=cpu")
    if int(driver.split(".")[0]) < MIN_NVIDIA_DRIVER:
        raise ProfileError(f"{where}: NVIDIA driver {driver} is older than the {MIN_NVIDIA_DRIVER} that torch "
                           f"{torch.__version__} (CUDA {torch.version.cuda}) needs; load or install driver "
                           f"{MIN_NVIDIA_DRIVER} or newer")
    check_torch_for("gpu", where, need_gpu=True)
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPUs, driver {driver}"
