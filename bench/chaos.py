"""A chaos run: an overlapped tiny GRPO run (`medvlm-r1 train configs/tiny_cpu.yaml`, train.max_staleness=1) hit,
at steps drawn by `random.Random(--seed)`, by what a cluster does to it, then checked.

Faults (each once, at least 3 steps apart; the next one only after the run logged a step after the last):
  worker_kill  SIGKILL of the rollout worker's actor process (`ray::RolloutWorker`)
  engine_kill  SIGKILL of its vLLM engine process (`EngineCore`; the config sets rollout.engine_in_process=false)
  engine_stop  SIGSTOP of the engine, never continued: rollout.timeout_s=30 must catch it and replace the worker
  driver_kill  SIGKILL of the driver's whole process group (Ray and vLLM with it), then the same command again
               (train.resume=auto, checkpoints every 5 steps)
Recovery time: from the signal to the next step row in metrics.jsonl.

Checks (exit 1 if one fails): every step 1..N exactly once in metrics.jsonl; reward/accuracy of the last 10
steps minus the first 10 >= tests/commands/test_learning_run.py's MARGIN (its SETTING is used, from the format-warmed tiny
model that tests/conftest.py builds); each step's metric row (time/*, throughput/*, faults/* left out) against an
undisturbed run of the same config (`--reference DIR`, else one is run and cached under
runs/chaos/reference-<hash of config, model and code>): steps before the first fault must be equal, and steps a
resumed run did again must equal the killed run's own rows of them when no worker fault came between; every
other step is reported as measured, with the reason when it differs; no process of any driver left (its Ray
session and engines); one worker replacement per worker fault. Writes runs/chaos/seed-S.json. Usage:
    python bench/chaos.py --seed S [--steps 60] [--reference DIR] [--train-seed 0] [key=value ...]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "commands"), str(ROOT / "bench")]
from cluster_utils import descendants, left_over, own_session, ray_session_dir  # noqa: E402
from test_learning_run import MARGIN, SETTING  # noqa: E402

OUT = ROOT / "runs" / "chaos"
CHECKPOINT_EVERY, GAP, MAX_DELAY_S, WAIT_S = 5, 3, 1.0, 900
TARGETS = {"worker_kill": ("ray::RolloutWorker", signal.SIGKILL), "engine_kill": ("EngineCore", signal.SIGKILL),
           "engine_stop": ("EngineCore", signal.SIGSTOP)}
KINDS = (*TARGETS, "driver_kill")
IGNORED = ("time/", "throughput/", "faults/")  # wall times and fault counts differ by nature
SHOWN = ("reward/total", "response_length/mean", "logprob_diff/mean_abs")  # what says how a batch differs
CODE = ("launcher", "learner", "rollout_workers", "rewards", "medvqa", "protocol")


def run_overrides(model: str, steps: int, train_seed: int, extra: list[str]) -> list[str]:
    """The chaos run's config (its reference's too, but for logging.run_dir)."""
    return [f"model.path={model}", "model.build_tiny_if_missing=false", "train.format_warmup_steps=0",
            f"train.steps={steps}", f"train.seed={train_seed}", *SETTING, "train.max_staleness=1",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.eval_every=0", "train.eval_at_end=false",
            "train.save_every=0", "logging.wandb=false", "logging.sample_every=0", "logging.progress_bar=false",
            "cluster.cpus_per_actor=0.5", "rollout.engine_in_process=false", "rollout.timeout_s=30",
            f"cluster.max_worker_restarts={2 * len(TARGETS)}", *extra]


def train_cmd(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "launcher", "train", "configs/tiny_cpu.yaml", *overrides, f"logging.run_dir={run_dir}"]


def warm_model() -> str:
    """bench/learning_spread.py's format-warmed tiny model (tests/conftest.py's), built once, in a child process."""
    folder = OUT / "model"
    if not (folder / "warm" / "config.json").exists():
        code = f"import learning_spread, pathlib; learning_spread.warm_model(pathlib.Path({str(folder)!r}))"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", check=True)
    return str(folder / "warm")


def config_hash(overrides: list[str], model: str) -> str:
    h = hashlib.sha256("\n".join([(ROOT / "configs/tiny_cpu.yaml").read_text(), *overrides]).encode())
    files = sorted(Path(model).rglob("*")) + sorted(p for d in CODE for p in (ROOT / d).rglob("*.py"))
    for p in files:
        if p.is_file():
            h.update(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p.name).encode() + p.read_bytes())
    return h.hexdigest()[:12]


def step_rows(run_dir: Path) -> list[dict]:
    rows = []
    path = run_dir / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written, or one torn by a kill
            pass
    return [r for r in rows if "reward/total" in r]


def reference_run(overrides: list[str], model: str, given: str | None, steps: int) -> Path:
    """The undisturbed run: `given`, or the cached one, or one run now."""
    if given:
        return Path(given).resolve()
    ref = OUT / f"reference-{config_hash(overrides, model)}"
    if (ref / "summary.json").exists() and len(step_rows(ref)) == steps:
        print(f"reference: {ref} (cached)", flush=True)
        return ref
    shutil.rmtree(ref, ignore_errors=True)  # a partial one would be resumed, not undisturbed
    ref.mkdir(parents=True)
    print(f"reference: running {steps} undisturbed steps into {ref}", flush=True)
    with open(ref.with_suffix(".log"), "w") as log, own_session(train_cmd(overrides, ref), stdout=log,
                                                               stderr=subprocess.STDOUT) as proc:
        if proc.wait() != 0:
            raise SystemExit(f"the reference run failed (exit {proc.returncode}); see {ref.with_suffix('.log')}")
    return ref


class Driver:
    """One `medvlm-r1 train` process group; remembers every process seen below it (replaced workers too)."""

    def __init__(self, cmd: list[str], log_path: Path, stack: contextlib.ExitStack):
        self.log_path = log_path
        log = stack.enter_context(open(log_path, "w"))
        self.proc = stack.enter_context(own_session(cmd, stdout=log, stderr=subprocess.STDOUT))
        self.seen: dict[tuple, psutil.Process] = {}
        self.session_dir: str | None = None
        self.last_look = 0.0

    def look(self) -> list[psutil.Process]:
        try:
            procs = descendants(self.proc.pid)
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault((p.pid, p.create_time()), p)
        if self.session_dir is None:
            with contextlib.suppress(AssertionError, psutil.Error):
                self.session_dir = ray_session_dir(procs)
        self.last_look = time.monotonic()
        return procs

    def one(self, marker: str, timeout: float = 60) -> psutil.Process:
        """The one live process below the driver whose name or command line holds `marker`."""
        deadline = time.monotonic() + timeout
        while True:
            found = []
            for p in self.look():
                with contextlib.suppress(psutil.Error):
                    if (marker in p.name() or marker in " ".join(p.cmdline())) and p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p)
            if len(found) == 1 or time.monotonic() > deadline:
                if len(found) != 1:
                    raise RuntimeError(f"{len(found)} processes match {marker!r}: {found}")
                return found[0]
            time.sleep(0.5)

    def left(self, timeout: float = 30) -> list[str]:
        """Its processes (and its Ray session's) still alive."""
        for _ in range(5):  # a process may end between left_over's liveness and status reads
            with contextlib.suppress(psutil.NoSuchProcess):
                return left_over(list(self.seen.values()), self.session_dir or "<no Ray session seen>", timeout)
        return ["could not list"]


class RunEnded(RuntimeError):
    pass


class Chaos:
    """The faulted run: its drivers, the faults injected, the killed run's rows before each resume."""

    def __init__(self, overrides: list[str], run_dir: Path, stack: contextlib.ExitStack):
        self.cmd, self.run_dir, self.stack = train_cmd(overrides, run_dir), run_dir, stack
        self.drivers: list[Driver] = []
        self.stale_inode = None  # metrics.jsonl as the killed driver left it, until the resumed one rewrites it
        self.killed_rows: list[dict] = []
        self.resumed_from = None
        self.start()

    def start(self) -> None:
        self.drivers.append(Driver(self.cmd, self.run_dir.parent / f"driver-{len(self.drivers) + 1}.log", self.stack))

    @property
    def driver(self) -> Driver:
        return self.drivers[-1]

    def rows(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        with contextlib.suppress(OSError):
            if self.stale_inode is not None and path.stat().st_ino == self.stale_inode:
                return []
        return step_rows(self.run_dir)

    def wait_step(self, step: int) -> float:
        """monotonic time when the running driver has logged a step >= `step`."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if any(r["step"] >= step for r in self.rows()):
                return time.monotonic()
            if self.driver.proc.poll() is not None:
                tail = self.driver.log_path.read_text(errors="replace")[-3000:]
                raise RunEnded(f"driver {len(self.drivers)} ended (exit {self.driver.proc.returncode}) before "
                               f"step {step}; the end of {self.driver.log_path}:\n{tail}")
            if time.monotonic() - self.driver.last_look > 1:
                self.driver.look()
            time.sleep(0.2)
        raise RunEnded(f"no step {step} within {WAIT_S} s")

    def inject(self, kind: str, planned: int, delay: float) -> dict:
        self.wait_step(planned)
        time.sleep(delay)
        step = max(r["step"] for r in self.rows())
        record = {"kind": kind, "planned_step": planned, "step": step, "delay_s": round(delay, 3)}
        if kind == "driver_kill":
            return {**record, **self.kill_driver(step)}
        marker, sig = TARGETS[kind]
        victim = self.driver.one(marker)
        victim.send_signal(sig)
        hit = time.monotonic()
        record.update(pid=victim.pid, process=marker, signal=signal.Signals(sig).name)
        record["recovery_s"] = round(self.wait_step(step + 1) - hit, 2)
        replaced = self.wait_replacement(step)
        if replaced is not None:
            record["replaced_at_step"], record["replaced_s"] = replaced[0], round(replaced[1] - hit, 2)
        return record

    def wait_replacement(self, step: int) -> tuple[int, float] | None:
        """(step, monotonic time) of the first row after `step` that counts a replaced worker; None if the
        run ends without one (the fault went unnoticed) or none comes within WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and self.driver.proc.poll() is None:
            found = [r["step"] for r in self.rows() if r["step"] > step and r.get("faults/worker_restarts")]
            if found:
                return min(found), time.monotonic()
            self.driver.look()
            time.sleep(0.5)
        return None

    def kill_driver(self, step: int) -> dict:
        """SIGKILL the driver's group; what it left; the same command again, until it logs a step."""
        self.driver.look()
        os.killpg(self.driver.proc.pid, signal.SIGKILL)
        hit = time.monotonic()
        self.driver.proc.wait()
        left = self.driver.left()
        self.killed_rows = step_rows(self.run_dir)
        latest = self.run_dir / "checkpoints" / "latest"
        self.resumed_from = int(latest.read_text().split("-")[1]) if latest.exists() else None
        self.stale_inode = (self.run_dir / "metrics.jsonl").stat().st_ino
        self.start()
        first = self.wait_step((self.resumed_from or 0) + 1)
        done = self.wait_step(step + 1)
        return {"pid": self.drivers[-2].proc.pid, "signal": "SIGKILL", "process": "driver process group",
                "left_after_kill": left, "resumed_from": self.resumed_from,
                "redone_steps": [r["step"] for r in self.killed_rows if r["step"] > (self.resumed_from or 0)],
                "recovery_s": round(first - hit, 2), "catch_up_s": round(done - hit, 2)}

    def finish(self) -> int:
        deadline = time.monotonic() + WAIT_S
        while self.driver.proc.poll() is None and time.monotonic() < deadline:
            self.driver.look()
            time.sleep(1)
        if self.driver.proc.poll() is None:
            raise RunEnded(f"driver {len(self.drivers)} still running {WAIT_S} s after the last fault")
        return self.driver.proc.returncode


def schedule(seed: int, steps: int) -> list[tuple[int, str, float]]:
    """(step, kind, delay after that step's row) per fault; the driver kill after the first checkpoint."""
    rng = random.Random(seed)
    lo, hi = 2, steps - 3
    for _ in range(10_000):
        picks = sorted(rng.sample(range(lo, hi + 1), len(KINDS)))
        if all(b - a >= GAP for a, b in zip(picks, picks[1:])) and picks[-1] > CHECKPOINT_EVERY:
            break
    else:
        raise SystemExit(f"{steps} steps leave no room for {len(KINDS)} faults {GAP} steps apart")
    kinds = list(KINDS)
    rng.shuffle(kinds)
    at = kinds.index("driver_kill")
    if picks[at] <= CHECKPOINT_EVERY:  # nothing to resume from yet: swap with a later fault
        other = rng.choice([i for i, s in enumerate(picks) if s > CHECKPOINT_EVERY])
        kinds[at], kinds[other] = kinds[other], kinds[at]
    return [(s, k, rng.uniform(0, MAX_DELAY_S)) for s, k in zip(picks, kinds)]


def differing(a: dict, b: dict) -> list[str]:
    keys = sorted(k for k in set(a) | set(b) if not k.startswith(IGNORED))
    return [k for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>")]


def why(step: int, diff: list[str], rows: dict, ref: dict, faults: list[dict], diverged: int | None) -> str:
    if step not in ref:
        return "the reference has no such step"
    if diverged is not None and diverged < step:
        return f"the weights differ since step {diverged}"
    before = [f for f in faults if f["step"] < step]
    cause = f"after {before[-1]['kind']} at step {before[-1]['step']}" if before else "no fault before it"
    mine, theirs = rows[step]["rollout_weight_version"], ref[step]["rollout_weight_version"]
    if mine != theirs:
        return f"{cause}: batch sampled with weight version {mine}, the reference's with {theirs}"
    shown = [k for k in SHOWN if k in diff] or diff[:2]
    values = ", ".join(f"{k} {rows[step][k]:.3g} vs {ref[step][k]:.3g}" for k in shown)
    return f"{cause}: same weight version label {mine}, other batch: {values}"


def compare(rows: list[dict], ref_rows: list[dict], faults: list[dict], chaos: Chaos) -> list[dict]:
    """Per step: equal to the reference?, equal to the killed run's own row (steps done again)?, why not."""
    by_step, ref = {r["step"]: r for r in rows}, {r["step"]: r for r in ref_rows}
    killed = {r["step"]: r for r in chaos.killed_rows if r["step"] > (chaos.resumed_from or 0)}
    kill = next((f for f in faults if f["kind"] == "driver_kill"), None)
    # a worker fault of the killed run touched the rows it logged after its checkpoint when the fault came before
    # the kill and its replacement (which samples again, maybe with newer weights) after the checkpoint's step
    touched = kill and any(f["kind"] != "driver_kill" and f["step"] < kill["step"]
                           and max(f["step"], f.get("replaced_at_step") or 0) >= (chaos.resumed_from or 0)
                           for f in faults)
    first_fault, table, diverged, same_versions = min(f["step"] for f in faults), [], None, True
    for step in sorted(by_step):
        diff = differing(by_step[step], ref[step]) if step in ref else ["<no reference row>"]
        entry = {"step": step, "equal_to_reference": not diff, "differing_keys": diff,
                 "rollout_weight_version": by_step[step]["rollout_weight_version"],
                 "reference_rollout_weight_version": ref.get(step, {}).get("rollout_weight_version"),
                 "worker_restarts": by_step[step].get("faults/worker_restarts"),
                 "expected_equal": step <= first_fault}
        if step in killed:
            entry["equal_to_killed_run"] = not differing(by_step[step], killed[step])
            entry["killed_run_row_expected_equal"] = not touched
        same_versions = same_versions and entry["rollout_weight_version"] == entry["reference_rollout_weight_version"]
        entry["versions_equal_so_far"] = same_versions
        if diff:
            entry["why"] = why(step, diff, by_step, ref, faults, diverged)
            diverged = step if diverged is None else diverged
        else:
            diverged = None  # equal again (a resume from a checkpoint before the divergence)
        table.append(entry)
    return table


def once_each(rows: list[dict], steps: int) -> tuple[bool, str]:
    got = [r["step"] for r in rows]
    missing = sorted(set(range(1, steps + 1)) - set(got))
    twice = sorted({s for s in got if got.count(s) > 1})
    extra = sorted(set(got) - set(range(1, steps + 1)))
    ok = not (missing or twice or extra) and got == sorted(got)
    return ok, "yes" if ok else f"missing {missing}, twice {twice}, unexpected {extra}, in file order {got}"


def learning_rise(rows: list[dict]) -> dict:
    acc = [r["reward/accuracy"] for r in sorted(rows, key=lambda r: r["step"])]
    window = max(1, min(10, len(acc) // 2))
    first, last = sum(acc[:window]) / window, sum(acc[-window:]) / window
    return {"window": window, "first": first, "last": last, "rise": last - first, "ok": last - first >= MARGIN}


def config_mismatch(run_dir: Path, ref_dir: Path) -> list[str]:
    """Lines of the two runs' config.yaml that differ, but for the run dir."""
    def lines(d: Path) -> set[str]:
        return {line for line in (d / "config.yaml").read_text().splitlines() if "run_dir:" not in line}
    return sorted(lines(run_dir) ^ lines(ref_dir))


def spans(steps: list[int]) -> str:
    out, steps = [], sorted(steps)
    for s in steps:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out) or "none"


def print_table(table: list[dict]) -> None:
    print(f"\n{'step':>4}  {'= ref':5}  {'= killed run':12}  {'version/ref':11}  {'restarts':8}  note")
    for e in table:
        killed = "" if "equal_to_killed_run" not in e else ("yes" if e["equal_to_killed_run"] else "no")
        notes = ["expected equal (before the first fault)"] if e["expected_equal"] else []
        if e.get("killed_run_row_expected_equal") is False:
            notes.append("the killed run's row came after a worker fault")
        note = "; ".join(notes + ([e["why"]] if "why" in e else []))
        print(f"{e['step']:>4}  {'yes' if e['equal_to_reference'] else 'no':5}  {killed:12}  "
              f"{str(e['rollout_weight_version']) + '/' + str(e['reference_rollout_weight_version']):<11}  "
              f"{e['worker_restarts'] or 0:<8}  {note}")


def checks(chaos: Chaos, rc: int, rows: list[dict], steps: int, table: list[dict], mismatch: list[str],
           faults: list[dict], ref_rows: list[dict]) -> dict:
    once, once_text = once_each(rows, steps)
    rise = learning_rise(rows) if rows else {"ok": False, "rise": float("nan"), "first": None, "last": None}
    ref_rise = learning_rise(ref_rows)
    bad_before = [e["step"] for e in table if e["expected_equal"] and not e["equal_to_reference"]]
    bad_redo = [e["step"] for e in table if e.get("killed_run_row_expected_equal") and not e["equal_to_killed_run"]]
    left = {f"driver {i + 1}": d.left() for i, d in enumerate(chaos.drivers)}
    worker_faults = sum(f["kind"] != "driver_kill" for f in faults)
    replaced = sum(d.log_path.read_text(errors="replace").count("replacing rollout worker") for d in chaos.drivers)
    return {
        "final run exited 0": (rc == 0, f"exit {rc}"),
        "every step once": (once, once_text),
        f"reward/accuracy rise >= {MARGIN}": (rise["ok"], f"first {rise['window']} {rise['first']:.3f} -> last "
                                              f"{rise['last']:.3f} (rise {rise['rise']:+.3f}; the reference "
                                              f"{ref_rise['rise']:+.3f})"),
        "same config as the reference": (not mismatch, "yes" if not mismatch else f"differs: {mismatch}"),
        "equal to the reference before the first fault": (not bad_before, f"differ: {bad_before}" if bad_before else "yes"),
        "steps done again equal the killed run's": (not bad_redo, f"differ: {bad_redo}" if bad_redo else "yes"),
        "no process left": (not any(left.values()), json.dumps(left)),
        "one replacement per worker fault": (replaced == worker_faults, f"{replaced} replacements logged for "
                                             f"{worker_faults} worker faults"),
    }


def fault_times(f: dict) -> str:
    if f["kind"] == "driver_kill":
        return (f"resumed from step {f['resumed_from']}: first step after {f['recovery_s']} s, step {f['step'] + 1} "
                f"after {f['catch_up_s']} s")
    replaced = (f"replaced in step {f['replaced_at_step']} after {f['replaced_s']} s" if "replaced_at_step" in f
                else "no replacement logged")
    return f"next step after {f['recovery_s']} s, {replaced}"


def summary_line(seed: int, faults: list[dict], steps: int, result: dict, table: list[dict]) -> str:
    fs = ", ".join(f"{f['kind']}@{f['step']} ({fault_times(f)})" for f in faults)
    equal = [e["step"] for e in table if e["equal_to_reference"]]
    redo = [e for e in table if "equal_to_killed_run" in e]
    redo_text = f"{sum(e['equal_to_killed_run'] for e in redo)}/{len(redo)} redone steps equal the killed run's"
    verdict = "PASS" if all(ok for ok, _ in result.values()) else "FAIL"
    rise = result[f"reward/accuracy rise >= {MARGIN}"][1]
    return (f"seed {seed}: {verdict} | faults {fs} | steps 1..{steps} once: {result['every step once'][0]} | "
            f"reward/accuracy {rise} | equal to the reference: steps {spans(equal)} of {steps}; {redo_text} | "
            f"left over: {'none' if result['no process left'][0] else result['no process left'][1]}")


def chaos_run(overrides: list[str], plan: list, out: Path) -> tuple[Chaos, list[dict], int | None, str | None]:
    """The faulted run, each fault in turn; any process left behind is killed by pid at the end."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    faults, rc, error = [], None, None
    with contextlib.ExitStack() as stack:
        chaos = Chaos(overrides, out / "run", stack)
        try:
            for step, kind, delay in plan:
                faults.append(chaos.inject(kind, step, delay))
                print(f"  {json.dumps(faults[-1])}", flush=True)
            rc = chaos.finish()
        except (RunEnded, RuntimeError) as exc:
            error = str(exc)
            print(f"  the run did not survive: {error}", flush=True)
    return chaos, faults, rc, error


def clean_up(chaos: Chaos) -> list[str]:
    """SIGKILL, by pid, every process of ours still alive (a SIGSTOPped engine the run did not kill)."""
    killed = []
    for d in chaos.drivers:
        for p in d.seen.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    killed.append(f"{p.pid} {p.name()} ({p.status()})")
                    p.kill()
    return killed


def verdict(chaos: Chaos, faults: list[dict], rc, error, ref_dir: Path, steps: int) -> tuple[dict, list, list]:
    """(checks, the per-step table, what had to be killed at the end), printed."""
    rows, ref_rows = step_rows(chaos.run_dir), step_rows(ref_dir)
    table = compare(rows, ref_rows, faults or [{"step": 0, "kind": "none"}], chaos)
    result = checks(chaos, rc, rows, steps, table, config_mismatch(chaos.run_dir, ref_dir), faults, ref_rows)
    if error:
        result["every fault survived"] = (False, error[-2000:])
    killed = clean_up(chaos)
    print_table(table)
    print()
    for name, (ok, detail) in result.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if killed:
        print(f"killed what was left: {killed}")
    return result, table, killed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="draws the fault steps (random.Random(seed))")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train-seed", type=int, default=0, help="train.seed of the run and its reference")
    parser.add_argument("--reference", help="an undisturbed run of the same config (else run and cached)")
    parser.add_argument("overrides", nargs="*", help="key=value for the run and its reference")
    args = parser.parse_args()
    os.chdir(ROOT)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan = schedule(args.seed, args.steps)
    overrides = run_overrides(warm_model(), args.steps, args.train_seed, args.overrides)
    ref_dir = reference_run(overrides, overrides[0].split("=", 1)[1], args.reference, args.steps)
    print(f"chaos run, seed {args.seed}: " + ", ".join(f"{k} after step {s} (+{d:.2f} s)" for s, k, d in plan),
          flush=True)
    started = time.monotonic()
    chaos, faults, rc, error = chaos_run(overrides, plan, OUT / f"seed-{args.seed}")
    result, table, killed = verdict(chaos, faults, rc, error, ref_dir, args.steps)
    odd = [e["step"] for e in table if not e["equal_to_reference"] and e["versions_equal_so_far"]]
    print(f"steps that differ from the reference though every batch up to them carried its weight version labels: "
          f"{spans(odd)}")
    line = summary_line(args.seed, faults, args.steps, result, table)
    print("\n" + line)
    report = {"seed": args.seed, "steps": args.steps, "reference": str(ref_dir), "run_dir": str(chaos.run_dir),
              "wall_s": round(time.monotonic() - started, 1), "plan": plan, "faults": faults,
              "checks": {k: {"ok": ok, "detail": d} for k, (ok, d) in result.items()}, "killed_at_end": killed,
              "learning": learning_rise(step_rows(chaos.run_dir)), "differ_with_equal_versions": odd,
              "summary": line, "command": " ".join(train_cmd(overrides, chaos.run_dir)), "table": table}
    (OUT / f"seed-{args.seed}.json").write_text(json.dumps(report, indent=1))
    print(f"written to {OUT / f'seed-{args.seed}.json'}")
    return 0 if all(ok for ok, _ in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
