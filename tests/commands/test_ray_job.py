"""`ray job submit --working-dir .` against a real Ray head started with `ray start --head` on this machine."""
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from cluster_utils import REPO_ROOT, SHORT_RUN, processes_mentioning, ray_port_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent  # the venv the tests run in: `ray` and `python` come from it


class RayHead:
    """`ray start --head --block` with every port free-picked and its own temp dir and auth token.

    It is stopped by SIGTERM to that process, which stops exactly this Ray instance; `ray stop` would
    stop every Ray instance of the user on the machine.
    """

    def __init__(self, tmp: Path):
        gcs, self.dashboard_port, flags, _ = ray_port_args()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
        token = tmp / "ray_auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # The client and the head must agree on token auth; ~/.ray/auth_token alone would decide otherwise.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                        PATH=f"{BIN}:{os.environ.get('PATH', '')}", WANDB_MODE="offline", VLLM_CPU_KVCACHE_SPACE="1")
        self.log = open(tmp / "ray-head.log", "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
             "--disable-usage-stats", *flags],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ray start exited with {self.proc.returncode}"
            if self.ray("job", "list", "--address", self.address).returncode == 0:
                return
            time.sleep(2)
        raise TimeoutError(f"the Ray dashboard at {self.address} did not answer within {timeout:.0f}s")

    def submit(self, *entrypoint: str, timeout: float) -> tuple[str, subprocess.CompletedProcess]:
        job_id = f"medvlm-{uuid.uuid4().hex[:8]}"
        res = self.ray("job", "submit", "--address", self.address, "--submission-id", job_id, "--working-dir", ".",
                       "--", *entrypoint, timeout=timeout)
        return job_id, res

    def succeeded(self, job_id: str) -> bool:
        out = self.ray("job", "status", "--address", self.address, "--log-color", "false", job_id).stdout
        return f"job '{job_id}' succeeded" in out.lower()

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("ray-head"))
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        deadline = time.monotonic() + 30
        while processes_mentioning(head.temp_dir) and time.monotonic() < deadline:
            time.sleep(1)
    assert processes_mentioning(head.temp_dir) == [], "Ray processes outlived the head"
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def test_job_runs_the_uploaded_code_with_the_heads_python(ray_head):
    job_id, res = ray_head.submit(
        "python", "-c", "import sys, launcher; print('EXE', sys.executable); print('PKG', launcher.__file__)",
        timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ray_head.succeeded(job_id)
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.startswith(("EXE ", "PKG ")))
    assert Path(lines["EXE"]).parent == BIN, lines  # the venv's python, not the system's
    pkg = Path(lines["PKG"]).resolve()
    assert REPO_ROOT not in pkg.parents, f"launcher imported from the repository, not the upload: {pkg}"
    assert ray_head.temp_dir in str(pkg), pkg


@pytest.mark.timeout(1500)
def test_job_submit_trains(ray_head, tmp_path):
    t0 = time.monotonic()
    run_dir = tmp_path / "run"
    job_id, res = ray_head.submit(
        "python", "-m", "launcher.cli", "train", "configs/tiny_cpu.yaml", f"logging.run_dir={run_dir}",
        f"model.path={tmp_path / 'tiny-qwen2-vl'}", *SHORT_RUN, timeout=1200)
    assert ray_head.succeeded(job_id), f"{res.stdout[-5000:]}\n{res.stderr[-3000:]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["reward/total"]) for r in steps)
    assert any((run_dir / "final").iterdir()), "no final policy saved"
    print(f"ray job submit training: {time.monotonic() - t0:.0f} s")
