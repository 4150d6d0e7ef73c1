"""bench/device_check.sh as the lent GPU machine would run it, on CPU at the tiny shape: a Python holding only
what that machine's image holds, the carried wheels from bench/device_wheels.sh, and no network. The run is
bench/gpu_learner.py's code path (ZeRO-3, gradient checkpointing, the reference, log-probs against
transformers), so its numbers are checked here too."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The lent machine's image ('cuda'), as the device tool's KINDS.md lists it (2026-11-17): the packages among
# these that this venv has are linked into a bare venv; DeepSpeed, omegaconf, pydantic and hjson are not here.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle colorama contourpy cycler filelock fsspec h11 hf-xet httpcore httpx
huggingface-hub idna iniconfig jinja2 joblib markdown-it-py markupsafe mdurl mpmath msgpack multidict networkx
ninja numpy packaging pandas peft pillow pip pluggy propcache protobuf psutil py-cpuinfo pygments pyparsing
pytest python-dateutil pyyaml regex requests rich safetensors scipy sentencepiece setuptools shellingham six
sympy tabulate tokenizers torch torchvision tqdm transformers typer typing-extensions urllib3 wheel yarl einops""".split()


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# What the wheels carry: never linked into the bare image, so that the check proves they are needed and enough.
CARRIED = {"deepspeed", "omegaconf", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"}


def _image_closure(ours: Path) -> set[str]:
    """The image's packages and, as installed here, everything they require (this venv's transformers may need
    more than the image's older one), less what the wheels carry."""
    dists = {_norm(d.metadata["Name"]): d for d in metadata.distributions(path=[str(ours)])}
    todo, seen = [_norm(n) for n in IMAGE], set()
    while todo:
        name = todo.pop()
        if name in seen or name in CARRIED or name not in dists:
            continue
        seen.add(name)
        for req in dists[name].requires or ():
            if "extra ==" not in req:
                todo.append(_norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]))
    return seen


def bare_image(root: Path) -> Path:
    """A venv without packages, then this venv's copies of the image's packages linked into it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))
    ours = Path(sysconfig.get_path("purelib"))
    wanted = _image_closure(ours)
    for dist in metadata.distributions(path=[str(ours)]):
        if _norm(dist.metadata["Name"]) not in wanted:
            continue
        for top in {Path(f).parts[0] for f in dist.files or () if not str(f).startswith("..")}:
            if (ours / top).exists() and not (site / top).exists():
                (site / top).symlink_to(ours / top)
    for repair in ours.glob("*torchvision_repair*"):  # `make setup`'s fix of this machine's CUDA-built torchvision,
        (site / repair.name).symlink_to(repair)      # which the lent machine's working torchvision does not need
    return root / "bin" / "python"


@pytest.fixture(scope="module")
def device_like(tmp_path_factory):
    """The image's Python and the wheels built for this Python's version; skipped without a network namespace."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"]).returncode:
        pytest.skip("unshare -rn with ip (a process with a loopback interface only) is not available here")
    root = tmp_path_factory.mktemp("device")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = subprocess.run(["bash", "bench/device_wheels.sh", str(root / "whl"), py], cwd=REPO,
                           env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    python = bare_image(root / "image")
    probe = subprocess.run([str(python), "-c", "import importlib.util as u, torch, transformers\nprint([n for n in "
                            "('deepspeed', 'omegaconf', 'pydantic', 'hjson') if u.find_spec(n)])"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # the image really lacks what the wheels carry
    return root, python


def run_check(root: Path, python: Path, wheels: Path, out: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{python.parent}:{os.environ['PATH']}", "HOME": str(root), "PYTHON": str(python),
           "TMPDIR": str(root), "OUT": str(out)}
    # A new network namespace has only a loopback interface, down: up, it carries the learner's own gloo group.
    script = f"ip link set lo up && exec bash bench/device_check.sh --tiny --wheels {wheels} --steps 1"
    return subprocess.run(["unshare", "-rn", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_device_check_runs_the_tiny_shape_from_carried_wheels_without_network(device_like):
    root, python = device_like
    res = run_check(root, python, root / "whl", root / "out")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    r = json.loads((root / "out" / "gpu_learner.json").read_text())
    assert r["finite"] and r["grad_norm"][0] > 0, r
    assert r["zero_stage"] == 3 and r["gradient_checkpointing"] and r["micro_batch_size"] == 4  # the paper config's
    assert r["samples"] == 8 and all(140 <= n <= 143 for n in r["prompt_tokens"]), r["prompt_tokens"]
    # fp32 on CPU: the learner's ZeRO-3 forward and transformers' own agree to rounding.
    assert r["logprob_tokens"] == 12 and r["logprob_diff/max_abs"] < 1e-4, r
    assert -20 < r["logprob/mean"] < 0 and r["step_s"] > 0 and r["tokens_per_s"] > 0
    log = (root / "out" / "device_check.log").read_text()
    assert "import deepspeed" in log and "0.19.8" in log and "done in" in log, log[-3000:]
    assert "step time" in log and "log-prob vs HF" in log  # gpu_learner.py's own report
    site = root / "medvlm-device-site"
    assert (site / "deepspeed").is_dir() and (site / "omegaconf").is_dir()


@pytest.mark.slow
def test_device_check_names_a_missing_wheel_before_training(device_like, tmp_path):
    root, python = device_like
    wheels = tmp_path / "whl"
    shutil.copytree(root / "whl", wheels)
    for w in wheels.glob("omegaconf-*.whl"):
        w.unlink()
    res = run_check(root, python, wheels, tmp_path / "out")
    text = res.stdout + res.stderr
    assert res.returncode == 1, text[-3000:]
    assert "No module named 'omegaconf'" in text and "add the missing package to bench/device_wheels.sh" in text
    assert "bench/gpu_learner.py --size" not in text  # stopped before the run
