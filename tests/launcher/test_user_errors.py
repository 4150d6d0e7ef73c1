"""Errors a user can make, each as one line on stderr naming the file, line, key or record, with the
exit code of its kind (2: config, 1: anything else), before Ray starts, and a traceback only with --debug."""
import json
import signal

import pytest

from launcher import stops
from launcher.cli import _failure, main
from launcher.train_loop import _summarize
from medvqa.loaders import LoadError, load_jsonl
from medvqa.synthetic import make_synthetic_split
from medvqa_files import write_jsonl


@pytest.fixture(autouse=True)
def _fresh_stops():
    stops.SIGNALS.reset()
    yield
    stops.SIGNALS.reset()  # `train` installs signal handlers in this process; put the previous ones back


def _run(capfd, *argv) -> tuple[int, list[str], str]:
    """(exit code, the lines starting with "medvlm-r1:", all of stderr)."""
    code = main(list(argv))
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("medvlm-r1:")], err


def _one_line(capfd, *argv) -> tuple[int, str]:
    code, lines, err = _run(capfd, *argv)
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capfd):
    f = tmp_path / "bad.yaml"
    f.write_text("rollout:\n  group_size: 4\nlearner:\n  betas: [0.9, 0.99\n  lr: 1e-6\n")
    code, line = _one_line(capfd, "train", str(f))
    assert code == 2
    assert line == (f"medvlm-r1: config error: config file {f}, line 5, column 5: YAML syntax error: did not find "
                    "expected ',' or ']' (while parsing a flow sequence started at line 4, column 10)")


@pytest.mark.parametrize("text, override, where", [
    ("rollout: 5\n", [], "in {f}"),
    ("", ["rollout=5"], "on the command line"),
    ("", ["rollout=5", "rollout.group_size=4"], "on the command line"),
])
def test_section_given_as_a_scalar(tmp_path, capfd, text, override, where):
    f = tmp_path / "c.yaml"
    f.write_text(text or "train:\n  steps: 1\n")
    code, line = _one_line(capfd, "train", str(f), *override)
    assert code == 2
    assert line == (f"medvlm-r1: config error: config section 'rollout' must be a mapping of keys, got 5 "
                    f"({where.format(f=f)})")


@pytest.mark.parametrize("override, message", [
    ("rewards.weights={format: 1.0, acuracy: 1.0}", "config key 'rewards.weights': unknown reward 'acuracy' "
     "(registered rewards: {known}); did you mean 'accuracy'?"),
    ("data.num_eval_per_modality=-1", "config key 'data.num_eval_per_modality': must be at least 1, got -1"),
    ("logging.num_samples_logged=-3", "config key 'logging.num_samples_logged': must be at least 0, got -3"),
    ("learner.lr=.inf", "config key 'learner.lr': must be a finite number, got inf"),
    ("grpo.clip_high=.nan", "config key 'grpo.clip_high': must be a finite number, got nan"),
    ("learner.betas=[0.9,.inf]", "config key 'learner.betas': must be a finite number, got [0.9, inf]"),
    ("rewards.weights.format=.nan", "config key 'rewards.weights.format': must be a finite number, got nan"),
])
def test_values_that_cannot_run_are_refused_at_validation(capfd, override, message):
    from rewards import REWARD_FUNCTIONS

    code, line = _one_line(capfd, "train", "configs/tiny_cpu.yaml", override)
    known = ", ".join(sorted(REWARD_FUNCTIONS))
    assert (code, line) == (2, f"medvlm-r1: config error: {message.replace('{known}', known)}")


def test_debug_adds_the_traceback_before_or_after_the_command(tmp_path, capfd):
    f = tmp_path / "bad.yaml"
    f.write_text("rollout: [\n")
    for argv in (["--debug", "train", str(f)], ["train", str(f), "--debug"]):
        code, lines, err = _run(capfd, *argv)
        assert code == 2 and len(lines) == 1 and "Traceback (most recent call last)" in err
        assert err.rstrip().splitlines()[-1] == lines[0]  # the reason stays the last line


def _non_utf8_jsonl(tmp_path):
    path = write_jsonl(make_synthetic_split("MRI", "train", 4, seed=0, num_options=2, image_size=56),
                      str(tmp_path / "set.jsonl"), str(tmp_path / "img"))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"question": "', b'"question": "\xff\xfe', 1)  # Latin-1 bytes in line 3
    path.write_bytes(b"".join(lines))
    return path, lines[2].index(b"\xff")


def test_non_utf8_jsonl_line_is_named_before_ray_starts(tmp_path, capfd):
    path, offset = _non_utf8_jsonl(tmp_path)
    with pytest.raises(LoadError, match=rf"^{path}:3: not UTF-8 text \(byte 0xff at offset {offset} of the line\)$"):
        load_jsonl(str(path))
    code, lines, err = _run(capfd, "train", "configs/tiny_cpu.yaml", "data.source=jsonl", f"data.path={path}",
                            f"logging.run_dir={tmp_path / 'run'}", "logging.wandb=false")
    assert code == 1 and "Traceback" not in err
    assert lines == [f"medvlm-r1: error: {path}:3: not UTF-8 text (byte 0xff at offset {offset} of the line)"]
    assert "Ray" not in err  # no Ray instance was started (Ray logs "Started a local Ray instance")


def test_zero_steps_summary_is_valid_json():
    summary = _summarize([], {})
    text = json.dumps(summary, allow_nan=False)  # raises on NaN or inf
    assert json.loads(text) == {"method": "grpo", "steps": 0, "first0/reward/accuracy": None, "last0/reward/accuracy": None,
                                "first0/reward/format": None, "last0/reward/format": None,
                                "first0/reward/total": None, "last0/reward/total": None}


def test_a_learner_error_from_ray_becomes_its_cause_line():
    from ray.exceptions import RayTaskError

    from learner.finite_guard import NonFiniteStepError

    cause = NonFiniteStepError("learner rank 1, optimiser step 7: non-finite values, loss=nan, grad_norm=nan, "
                               "lr=0.001; the update was not applied")
    remote = RayTaskError("LearnerRank.train_on", "Traceback (most recent call last):\n  ...", cause)
    assert _failure(remote.as_instanceof_cause()) == (1, f"error: {cause}")
    other = RayTaskError("RolloutWorker.generate", "Traceback ...", KeyError("pixel_values"),
                         proctitle="ray::RolloutWorker.generate")
    assert _failure(other.as_instanceof_cause()) == (
        1, "error: RolloutWorker.generate failed: KeyError: 'pixel_values' (--debug shows the traceback)")


def test_our_multi_line_message_becomes_one_line_keeping_its_end():
    from launcher.actor_group import ActorDiedError

    exc = ActorDiedError("learner rank 0 died while training: The actor died unexpectedly.\n\tclass_name: "
                         "LearnerRank\n\tpid: 4242\n; a learner rank cannot be replaced in place: resume from /r/ck",
                         "learner rank", 0)
    assert _failure(exc) == (1, "error: learner rank 0 died while training: The actor died unexpectedly. class_name: "
                                "LearnerRank pid: 4242 ; a learner rank cannot be replaced in place: resume from /r/ck")


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGUSR1", 143)])
def test_a_recorded_stop_ends_at_the_next_check_with_its_exit_code(signame, code):
    stops.SIGNALS.install_handlers()
    assert stops.SIGNALS.requested() is None
    stops.SIGNALS.check()  # nothing requested: no-op
    signal.raise_signal(getattr(signal, signame))  # only recorded: this line returns
    assert stops.SIGNALS.requested() == signame
    with pytest.raises(stops.StopRequested) as err:
        stops.SIGNALS.check()
    assert err.value.exit_code == code and err.value.checkpoint is None
    assert _failure(err.value) == (code, f"stopped by {signame}; no checkpoint saved")
    assert _failure(stops.StopRequested(signame, "/runs/r/checkpoint-000040")) == (
        code, f"stopped by {signame}; last checkpoint: /runs/r/checkpoint-000040")


@pytest.mark.parametrize("first, second, code", [("SIGTERM", "SIGTERM", 143), ("SIGINT", "SIGINT", 130),
                                                 ("SIGUSR1", "SIGINT", 130), ("SIGTERM", "SIGINT", 130)])
def test_a_second_signal_stops_at_once(first, second, code, monkeypatch):
    monkeypatch.setattr(stops, "ECHO_S", 0.0)  # a second SIGTERM long after the first
    stops.SIGNALS.install_handlers()
    signal.raise_signal(getattr(signal, first))
    with pytest.raises(KeyboardInterrupt) as err:  # the one exception that leaves a blocking ray.get as it is
        signal.raise_signal(getattr(signal, second))
    assert stops.SIGNALS.requested() == first and stops.SIGNALS.last_signal() == second
    assert err.value.exit_code == code and _failure(err.value) == (code, f"stopped at once by {second}")


def test_a_sigterm_repeated_at_once_is_the_same_stop():
    """scancel signals the driver and the batch script, which forwards its SIGTERM: one request, not two."""
    stops.SIGNALS.install_handlers()
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)  # within ECHO_S: only recorded, this line returns
    assert stops.SIGNALS.requested() == "SIGTERM"
    with pytest.raises(stops.StopRequested):
        stops.SIGNALS.check()
    with pytest.raises(KeyboardInterrupt):  # a person's Ctrl-C after it still stops at once
        signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("immediate", [True, False])
def test_the_clean_up_after_a_stop_is_kept_from_one_more_signal(immediate, monkeypatch):
    monkeypatch.setattr(stops, "ECHO_S", 0.0)
    stops.SIGNALS.install_handlers(immediate=immediate)
    if not immediate:
        signal.raise_signal(signal.SIGTERM)  # recorded
    with pytest.raises(stops.StopNow):
        signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)  # during the clean-up: held, this line returns
    with pytest.raises(stops.StopNow) as err:  # one more still stops at once
        signal.raise_signal(signal.SIGINT)
    assert err.value.exit_code == 130


def test_reset_puts_back_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stops.SIGNALS.install_handlers()
    stops.SIGNALS.install_handlers()  # again, as after ray.init: still the first-found handlers are kept
    assert signal.getsignal(signal.SIGTERM) is not before[0]
    stops.SIGNALS.reset()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("stopping", [False, True])
def test_a_stopping_run_replaces_no_rollout_worker(stopping):
    """The controller acts on the stop requests it was handed: with one requested (a scancel stops the Ray
    nodes too) a failed worker's error is raised as it is, and no replacement is counted or started;
    otherwise the replacement budget applies (0 here: exhausted at once)."""
    from launcher.actor_group import ActorDiedError, ActorGroup
    from launcher.config import load_config
    from launcher.controller import Controller, WorkerRestartsExhausted

    signals = stops.StopSignals()
    if stopping:
        signals.request("SIGTERM")
    cfg = load_config("configs/tiny_cpu.yaml", ["cluster.max_worker_restarts=0"])
    controller = Controller(cfg, "", ActorGroup("learner rank", []), ActorGroup("rollout worker", []), None, [], 0,
                            signals=signals)
    failure = ActorDiedError("rollout worker 0 died while generating", "rollout worker", 0)
    with pytest.raises(ActorDiedError if stopping else WorkerRestartsExhausted) as err:
        controller.replace_workers({0: failure})
    assert (err.value is failure) == stopping
    assert controller.restarts == (0 if stopping else 1)
