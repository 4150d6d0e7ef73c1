"""Lets a CUDA build of torchvision import against the CPU build of torch.

Installed into the CPU virtual environment as a module plus a ``.pth`` line (see the Makefile),
so it is active in every Python process of that environment, vLLM's spawned engine processes
included. It costs nothing until something imports torchvision: a meta-path hook then tries to
load torchvision's C++ ops, and only if they fail to load (the CUDA build needs libc10_cuda.so)
defines the schemas of the two ops whose fake kernels torchvision registers at import time.
Image transforms in pure torch keep working; the detection ops (nms and friends) do not.
"""
import importlib.abc
import sys

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _repair() -> None:
    import glob
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    try:
        for lib in libs:
            torch.ops.load_library(lib)
        if libs:
            return
    except (OSError, RuntimeError):
        pass
    for name, schema in _SCHEMAS.items():
        if not _schema_exists(torch, name):
            torch.library.define(f"torchvision::{name}", schema)


def _schema_exists(torch, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            _repair()
        except Exception as exc:  # never block the import itself; report why the repair did not apply
            print(f"torchvision_repair: could not prepare torchvision ops: {exc}", file=sys.stderr)
        return None


def install() -> None:
    if not any(isinstance(h, _Hook) for h in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
