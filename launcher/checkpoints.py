"""Full checkpoints of a run and resuming from them.

A checkpoint is `<run>/checkpoints/step-XXXXXX/`: `learner/` holds every learner rank's DeepSpeed state
(model, optimiser, scheduler, the ZeRO partitions as they are, each rank's RNG), `driver_state.json` the
driver's (step, weight version, prompt sampler position, W&B run id, the policy's starting checkpoint).
It is written into `step-XXXXXX.tmp/`, gets a `manifest.json` (every file's size and SHA-256,
launcher/manifest.py) last, and is renamed when complete; `<run>/checkpoints/latest` names it and is
replaced last, so an interrupted save never becomes the one a run resumes from. A save that fails removes
its `.tmp/`; one that would not fit in the free space is refused before anything is written.

Resuming verifies the checkpoint against its manifest. `train.resume=auto` (or a run dir) passes over a
damaged newest checkpoint to the newest intact one, saying which and why; a checkpoint folder named by
`train.resume` must be intact. A checkpoint from before manifests (its driver state does not say it has
one) is accepted unverified, with a warning.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

from launcher.config import Config, ConfigError, load_config, to_dict
from launcher.manifest import MANIFEST, Damage, DamageFound, verify, write_manifest

log = logging.getLogger(__name__)

DRIVER_STATE = "driver_state.json"
LEARNER_DIR = "learner"
# Set in the driver state of every checkpoint that carries a manifest: one without both is damaged, one
# with neither was written before manifests.
HAS_MANIFEST = "manifest"
_STEP_DIR = re.compile(r"step-(\d+)$")
# Config keys whose change would make a checkpoint's state wrong for the new run: the model and its
# shapes, the learner's partitioning, what the sampler's position indexes into, and the seeds.
STATE_KEYS = (
    "model.path", "model.freeze_vision", "model.lora_rank", "model.lora_alpha", "model.lora_targets",
    "rollout.group_size", "learner.num_ranks", "learner.zero_stage", "learner.precision", "learner.offload_optimizer",
    "data.source", "data.path", "data.train_modalities", "data.num_train", "data.seed", "data.question_types",
    "data.num_options", "train.seed", "train.format_warmup_steps",
)
# What a run dir holds once a run has written into it.
_RUN_FILES = ("metrics.jsonl", "samples.jsonl", "summary.json", "final", "checkpoints", "eval")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:06d}"


def latest(run_dir: Path) -> Optional[Path]:
    """The complete checkpoint that `latest` names, or None."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    if not (path / DRIVER_STATE).is_file():
        raise ConfigError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / DRIVER_STATE).read_text())


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved (e.g. the free space would not hold it)."""


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step`; learners write into `<it>/learner`.
    Refused (CheckpointError) when the free space is less than the last checkpoint took."""
    tmp = step_dir(run_dir, step).with_suffix(".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was interrupted
    check_free_space(run_dir, step)
    (tmp / LEARNER_DIR).mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def saving(run_dir: Path, step: int) -> Iterator[Path]:
    """`begin`, and on any failure before the checkpoint is committed, remove its `.tmp/` folder (a
    failed save leaves neither a partial folder nor a `latest` that names one)."""
    tmp = begin(run_dir, step)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_free_space(run_dir: Path, step: int) -> None:
    """Raise CheckpointError when the checkpoints' filesystem has less free space than the newest
    checkpoint took (the next one is about as large; older ones are pruned only after it is written)."""
    done = _committed(run_dir)
    if not done:
        return  # the first one: nothing to measure it by
    needed = _folder_bytes(done[0])
    free = shutil.disk_usage(checkpoints_dir(run_dir)).free
    if free < needed:
        raise CheckpointError(
            f"not enough free space for the checkpoint of step {step}: {checkpoints_dir(run_dir)} has {free} bytes "
            f"({free / 2**30:.2f} GiB) free, the last checkpoint ({done[0].name}) took {needed} bytes "
            f"({needed / 2**30:.2f} GiB); free some space or lower train.keep_checkpoints")


def commit(run_dir: Path, tmp: Path, state: dict, config_yaml: str, keep: int) -> Path:
    """Write the driver's state, the run's config and the manifest (last), make the checkpoint visible,
    point `latest` at it, prune old ones."""
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / DRIVER_STATE).write_text(json.dumps({**state, HAS_MANIFEST: MANIFEST}, indent=2))
    t0 = time.perf_counter()
    total = write_manifest(tmp)["total_bytes"]
    log.debug("manifest of %s: %d bytes hashed in %.2f s", tmp.name, total, time.perf_counter() - t0)
    final = step_dir(run_dir, int(state["step"]))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = checkpoints_dir(run_dir) / "latest"
    pointer.with_suffix(".tmp").write_text(final.name)
    os.replace(pointer.with_suffix(".tmp"), pointer)
    _prune(run_dir, keep, final)
    return final


def _step_of(folder: Path) -> Optional[int]:
    match = _STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else None


def _committed(run_dir: Path) -> list[Path]:
    """The committed checkpoint folders, newest first."""
    done = [p for p in checkpoints_dir(run_dir).glob("step-*") if p.is_dir() and _step_of(p) is not None]
    return sorted(done, key=_step_of, reverse=True)


def _prune(run_dir: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    for old in _committed(run_dir)[keep:]:
        if old != newest:
            shutil.rmtree(old)


def damage(checkpoint: Path) -> list[Damage]:
    """How a committed checkpoint differs from its manifest (empty when intact). A checkpoint without a
    manifest whose driver state does not claim one predates manifests: accepted, with a warning."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return [Damage(".", "a checkpoint folder", "no such folder")]
    if not (checkpoint / MANIFEST).is_file():
        try:
            state = read_state(checkpoint)
        except (OSError, ValueError) as exc:
            return [Damage(DRIVER_STATE, "the driver's state", f"{type(exc).__name__}: {exc}")]
        if HAS_MANIFEST in state:
            return [Damage(MANIFEST, f"a manifest ({DRIVER_STATE} says it has one)", "no such file")]
        log.warning("checkpoint %s was written before checkpoints carried a manifest: resuming from it unverified",
                    checkpoint)
        return []
    t0 = time.perf_counter()
    try:
        manifest = verify(checkpoint)
    except DamageFound as exc:
        return exc.damage
    log.info("checkpoint %s verified: %d files, %.1f MB in %.1f s", checkpoint, len(manifest["files"]),
             manifest["total_bytes"] / 1e6, time.perf_counter() - t0)
    return []


def _describe(checkpoint: Path, found: list[Damage]) -> str:
    return f"checkpoint {checkpoint} is damaged: " + "; ".join(map(str, found))


def verified(checkpoint: Path) -> Path:
    """`checkpoint` when intact, else a ConfigError naming each damaged file (expected vs found)."""
    found = damage(checkpoint)
    if found:
        raise ConfigError(f"config key 'train.resume': {_describe(checkpoint, found)}")
    return Path(checkpoint)


def newest_intact(run_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` names if intact, else the newest intact one before it (each damaged one
    passed over is logged with what is wrong); None when the run dir has no checkpoint; a ConfigError
    when none is intact."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    named = checkpoints_dir(run_dir) / pointer.read_text().strip()
    newest = _step_of(named)
    if newest is None:
        log.error("%s names %r, which is not a checkpoint folder", pointer, named.name)
    candidates = [named] if newest is not None else []
    candidates += [p for p in _committed(run_dir) if newest is None or _step_of(p) < newest]
    damaged = []
    for candidate in candidates:
        found = damage(candidate)
        if not found:
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint, instead of the damaged %s", candidate,
                            ", ".join(p.name for p in damaged))
            return candidate
        log.error(_describe(candidate, found))
        damaged.append(candidate)
    names = ", ".join(p.name for p in damaged)
    raise ConfigError(f"no intact checkpoint to resume from in {checkpoints_dir(run_dir)}: {names} "
                      f"{'is' if len(damaged) == 1 else 'are'} damaged (see the log above); restore one, or start "
                      "afresh with train.resume=false logging.overwrite=true")


def resolve_resume(cfg: Config, run_dir: Path) -> Optional[Path]:
    """The checkpoint this run resumes from, or None for a fresh start (after clearing the run dir when
    `logging.overwrite` allows). A run dir with content but no checkpoint is never silently reused."""
    choice = cfg.train.resume
    if choice not in ("auto", "false"):
        path = Path(choice)
        if (path / "checkpoints").is_dir():
            found = newest_intact(path)  # a run dir: as with auto, its newest intact checkpoint
        elif (path / DRIVER_STATE).is_file() or (path / MANIFEST).is_file():
            found = verified(path)  # a checkpoint folder: exactly that one
        else:
            found = None
        if found is None:
            raise ConfigError(f"config key 'train.resume': {choice} is neither a checkpoint folder nor a run "
                              "dir with a complete checkpoint")
        return found
    used = [name for name in _RUN_FILES if (run_dir / name).exists()]
    if choice == "auto" and used:
        found = newest_intact(run_dir)
        if found is not None:
            return found
    if used and not cfg.logging.overwrite:
        raise ConfigError(f"run dir {run_dir} already holds a run ({', '.join(used)}) and no complete checkpoint "
                          "to resume from; choose another logging.run_dir, or set train.resume=false "
                          "logging.overwrite=true to replace it")
    if used:
        log.warning("logging.overwrite: removing the previous run's %s from %s", ", ".join(used), run_dir)
        for name in used:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return None


def check_compatible(cfg: Config, checkpoint: Path) -> None:
    """Refuse config changes that would make the checkpoint's state wrong, naming the key."""
    saved_path = Path(checkpoint) / "config.yaml"
    saved = to_dict(load_config(str(saved_path)))
    now = to_dict(cfg)
    for key in STATE_KEYS:
        section, name = key.split(".")
        if saved[section][name] != now[section][name]:
            raise ConfigError(f"config key '{key}' is {now[section][name]!r} but the checkpoint {checkpoint} was "
                              f"written with {saved[section][name]!r}; resuming would not restore that state")
