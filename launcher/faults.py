"""What a stuck actor was doing: the Python stack of every thread of its processes, written to
`<run>/faults/` before the actor is killed.

py-spy reads a process's memory from outside, so it works where an in-process dump cannot: a process
stopped by SIGSTOP, or one blocked in C (a collective that never returns, a read on a dead socket).
A stopped process cannot be paused by py-spy's default mode, so that case is read without pausing.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import ray

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
def python_stacks(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, py-spy's dump or why there is none) for each process; runs on the processes' node."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = []
    for pid in pids:
        text = ""
        for extra in ([], ["--nonblocking"]):  # pausing fails on a stopped process; reading still works
            try:
                res = subprocess.run([exe, "dump", "--pid", str(pid), *extra], capture_output=True, text=True,
                                     timeout=60)
            except (OSError, subprocess.TimeoutExpired) as exc:
                text = f"py-spy could not run: {exc}"
                break
            text = res.stdout if res.returncode == 0 else f"py-spy dump {' '.join(extra)} failed:\n{res.stderr}"
            if res.returncode == 0:
                break
        out.append((pid, text))
    return out


def write_stacks(name: str, pids: list[int], strategy, out_dir: Path, doing: str) -> Optional[Path]:
    """The stacks of `pids` (one actor's processes, scheduled on its node by `strategy`) in
    `out_dir/<name>-<time>.txt`; None (with a warning) when they could not be read."""
    try:
        stacks = ray.get(python_stacks.options(scheduling_strategy=strategy).remote(pids), timeout=120)
    except Exception as exc:  # the node may be gone: the run's own error matters more
        log.warning("%s: could not read its stacks: %s", name, exc)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    body = "\n".join(f"=== process {pid} ===\n{text}" for pid, text in stacks)
    path.write_text(f"{name}, stuck while {doing}\n\n{body}")
    return path
