"""Full checkpoints of a run and resuming from them.

A checkpoint is `<run>/checkpoints/step-XXXXXX/`: `learner/` holds every learner rank's DeepSpeed state
(model, optimiser, scheduler, the ZeRO partitions as they are, each rank's RNG), `driver_state.json` the
driver's (step, weight version, prompt sampler position, W&B run id, the policy's starting checkpoint).
It is written into `step-XXXXXX.tmp/` and renamed when complete; `<run>/checkpoints/latest` names it and
is replaced last, so an interrupted save never becomes the one a run resumes from.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from launcher.config import Config, ConfigError, load_config, to_dict

log = logging.getLogger(__name__)

DRIVER_STATE = "driver_state.json"
LEARNER_DIR = "learner"
# Config keys whose change would make a checkpoint's state wrong for the new run: the model and its
# shapes, the learner's partitioning, what the sampler's position indexes into, and the seeds.
STATE_KEYS = (
    "model.path", "model.freeze_vision", "rollout.group_size", "learner.num_ranks", "learner.zero_stage",
    "learner.precision", "learner.offload_optimizer", "data.source", "data.path", "data.train_modalities",
    "data.num_train", "data.seed", "data.question_types", "data.num_options", "train.seed",
    "train.format_warmup_steps",
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


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step`; learners write into `<it>/learner`."""
    tmp = step_dir(run_dir, step).with_suffix(".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was interrupted
    (tmp / LEARNER_DIR).mkdir(parents=True)
    return tmp


def commit(run_dir: Path, tmp: Path, state: dict, config_yaml: str, keep: int) -> Path:
    """Write the driver's state and the run's config, make the checkpoint visible, point `latest` at
    it, prune old ones."""
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / DRIVER_STATE).write_text(json.dumps(state, indent=2))
    final = step_dir(run_dir, int(state["step"]))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = checkpoints_dir(run_dir) / "latest"
    pointer.with_suffix(".tmp").write_text(final.name)
    os.replace(pointer.with_suffix(".tmp"), pointer)
    _prune(run_dir, keep, final)
    return final


def _prune(run_dir: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in checkpoints_dir(run_dir).glob("step-*") if p.is_dir() and p.suffix != ".tmp")
    for old in done[:-keep]:
        if old != newest:
            shutil.rmtree(old)


def resolve_resume(cfg: Config, run_dir: Path) -> Optional[Path]:
    """The checkpoint this run resumes from, or None for a fresh start (after clearing the run dir when
    `logging.overwrite` allows). A run dir with content but no checkpoint is never silently reused."""
    choice = cfg.train.resume
    if choice not in ("auto", "false"):
        path = Path(choice)
        found = latest(path) if (path / "checkpoints").is_dir() else path
        if found is None or not (found / DRIVER_STATE).is_file():
            raise ConfigError(f"config key 'train.resume': {choice} is neither a checkpoint folder nor a run "
                              "dir with a complete checkpoint")
        return found
    used = [name for name in _RUN_FILES if (run_dir / name).exists()]
    if choice == "auto" and used:
        found = latest(run_dir)
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
