"""`medvlm-r1`: train, sft, eval, report, make-tiny-model, check."""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import traceback
from pathlib import Path

from launcher import stops
from launcher.config import ConfigError, load_config
from protocol.profile import ProfileError

# Exceptions of these packages carry messages written for the user; others get their type named.
_PROJECT_PACKAGES = ("launcher", "learner", "medvqa", "protocol", "rewards", "rollout_workers")


def _cmd_train(args) -> int:
    # Start-up has nothing to save, so a signal stops it at once (Slurm's scancel gives KillWait, 30 s by
    # default, before SIGKILL; the format warm-up and the engines' start take longer). Once the loop can
    # checkpoint, run_training defers stops to the next step boundary.
    stops.SIGNALS.install_handlers(immediate=True)
    from launcher.train_loop import print_summary, run_training

    cfg = load_config(args.config, args.overrides)
    result = run_training(cfg)
    print_summary(result)
    return 0


def _cmd_sft(args) -> int:
    stops.SIGNALS.install_handlers(immediate=True)  # no full checkpoints to write: a signal ends the run at once
    from launcher.sft_loop import print_summary, run_sft

    cfg = load_config(args.config, args.overrides)
    print_summary(run_sft(cfg))
    return 0


def _cmd_check(args) -> int:
    """The config loads, and this node has what its profile needs (slurm/train_8gpu.sh runs it before Ray)."""
    from protocol.profile import check_gpu_node

    cfg = load_config(args.config, args.overrides)
    found = check_gpu_node("this node") if cfg.cluster.device == "gpu" else "cpu profile"
    print(f"medvlm-r1: check: {args.config} loads; {found}")
    return 0


def _cmd_make_tiny_model(args) -> int:
    try:
        out, shape = _build_random_model(args)
    except ValueError as exc:
        print(f"medvlm-r1: make-tiny-model: {exc}", file=sys.stderr)
        return 2
    print(f"{shape} written to {out}")
    return 0


def _build_random_model(args) -> tuple[str, str]:
    """(folder, a description of the shape) of the checkpoint `make-tiny-model` wrote."""
    from medvqa.tiny_model import build_real_shape_model, build_tiny_model

    if args.like:
        if args.hidden is not None or args.intermediate is not None:
            raise ValueError("--like fixes the widths: only --layers and --vision-depth change its shape")
        out = build_real_shape_model(args.out_dir, args.like, args.layers, args.vision_depth, args.seed)
        depths = [f"{n} {what}" for n, what in ((args.layers, "layers"), (args.vision_depth, "vision blocks")) if n]
        return out, f"random Qwen2-VL shaped like {args.like}" + (f" ({', '.join(depths)})" if depths else "")
    if args.vision_depth is not None:
        raise ValueError("--vision-depth goes with --like (the tiny model's vision tower is fixed)")
    # None means the builder's default, so that the defaults are written once, in medvqa.tiny_model.
    sizes = {k: v for k, v in (("hidden", args.hidden), ("layers", args.layers),
                               ("intermediate", args.intermediate)) if v is not None}
    out = build_tiny_model(args.out_dir, seed=args.seed, **sizes)
    return out, "tiny Qwen2-VL" + (f" ({', '.join(f'{k} {v}' for k, v in sizes.items())})" if sizes else "")


def _cmd_eval(args) -> int:
    from launcher.eval_cmd import run_eval

    stops.SIGNALS.install_handlers(immediate=True)  # nothing to save: a signal ends the evaluation at once
    cfg = load_config(args.config, args.overrides)
    summary = run_eval(cfg, args.checkpoint, Path(args.out) if args.out else None)
    for name, r in summary["results"].items():
        print(f"{name:10s} n={r['n']:4d} accuracy={r['accuracy']:.3f} format={r['format_rate']:.3f} "
              f"length={r['mean_length']:.1f}")
    print(f"outputs in {summary['out_dir']}")
    return 0


def _cmd_report(args) -> int:
    if args.compare or args.base:
        from launcher.compare import ComparisonError, write_comparison

        try:
            path = write_comparison([Path(args.run_dir), *map(Path, args.compare)],
                                    Path(args.base) if args.base else None, Path(args.out or args.run_dir))
        except (ComparisonError, FileNotFoundError) as exc:
            print(f"medvlm-r1: cannot compare: {exc}", file=sys.stderr)
            return 2
        print(f"comparison written to {path} (and .html, .png)")
        return 0
    from launcher.report import write_report

    path = write_report(Path(args.run_dir))
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the command; SUPPRESS keeps a subcommand's default from
    # overwriting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error, not only its one-line reason")
    p = argparse.ArgumentParser(prog="medvlm-r1", description=__doc__, parents=[common])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common], help="GRPO training run: medvlm-r1 train CONFIG [key=value ...]")
    t.add_argument("config", help="YAML config, e.g. configs/tiny_cpu.yaml")
    t.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. learner.lr=5e-7)")
    t.set_defaults(func=_cmd_train)
    s = sub.add_parser("sft", parents=[common],
                       help="supervised baseline on the same records: medvlm-r1 sft CONFIG [key=value ...]")
    s.add_argument("config", help="YAML config with an sft section, e.g. configs/tiny_cpu_sft.yaml")
    s.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. sft.target=letter)")
    s.set_defaults(func=_cmd_sft)
    c = sub.add_parser("check", parents=[common],
                       help="load a config and check this node can run its profile (a GPU run: CUDA torch, GPU, driver)")
    c.add_argument("config", help="YAML config, e.g. configs/medvlm_r1_2b.yaml")
    c.add_argument("overrides", nargs="*", help="config overrides as key=value")
    c.set_defaults(func=_cmd_check)
    m = sub.add_parser("make-tiny-model", parents=[common],
                       help="build the tiny random Qwen2-VL checkpoint used by tests and the demo, or with "
                            "--like one with a published model's config")
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--hidden", type=int, default=None,
                   help="text hidden size, a multiple of 64 (heads of 64; default 128)")
    m.add_argument("--layers", type=int, default=None,
                   help="text decoder layers (default 2; with --like, the published number)")
    m.add_argument("--intermediate", type=int, default=None, help="text MLP size (default: twice --hidden)")
    m.add_argument("--like", default=None, metavar="NAME",
                   help="random weights in a published model's config, e.g. qwen2-vl-2b (Qwen2-VL-2B-Instruct)")
    m.add_argument("--vision-depth", type=int, default=None,
                   help="vision blocks, with --like (default: the published number)")
    m.set_defaults(func=_cmd_make_tiny_model)
    e = sub.add_parser("eval", parents=[common],
                       help="greedy evaluation of a checkpoint on the config's held-out sets")
    e.add_argument("checkpoint", help="a saved policy, the tiny model folder, or a Hugging Face model path")
    e.add_argument("--config", default=None, help="YAML config for data/rollout settings (default: built-ins)")
    e.add_argument("--out", default=None, help="output folder (default: <checkpoint>/eval)")
    e.add_argument("overrides", nargs="*", help="config overrides as key=value")
    e.set_defaults(func=_cmd_eval)
    r = sub.add_parser("report", parents=[common], help="Markdown and HTML report of a run directory")
    r.add_argument("run_dir")
    r.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                   help="other runs (e.g. SFT) for one table: base, SFT and GRPO rows per modality")
    r.add_argument("--base", default=None, metavar="EVAL_DIR",
                   help="base-model evaluation (medvlm-r1 eval --out) instead of the GRPO run's step 0")
    r.add_argument("--out", default=None, help="folder for comparison.md/.html/.png (default: RUN_DIR)")
    r.set_defaults(func=_cmd_report)
    return p


def _is_ours(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in _PROJECT_PACKAGES


def _remote_error(exc: BaseException):
    """(cause, the actor method or task it came from) of an error raised in a Ray task, else None."""
    ray = sys.modules.get("ray")
    if ray is None or not isinstance(exc, ray.exceptions.RayTaskError) or not isinstance(exc.cause, BaseException):
        return None
    # ray.get raises a copy that is also an instance of the cause's class, without function_name; the
    # first line of its message holds the process title, ray::<Class.method>.
    title = re.search(r"ray::([\w.]+)", str(exc).split("\n", 1)[0])
    return exc.cause, exc.__dict__.get("function_name") or (title.group(1) if title else "a Ray task")


def _one_line(exc: BaseException) -> str:
    """An error's message as one line; an error of a Ray task is told by its cause."""
    remote = _remote_error(exc)
    if remote is not None:
        cause, where = remote
        return _one_line(cause) if _is_ours(cause) else f"{where} failed: {_one_line(cause)}"
    text = str(exc).strip()
    if _is_ours(exc) and text:
        # Our messages may quote a multi-line one (Ray's account of a dead actor) before what to do next.
        return " ".join(text.split())
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _failure(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line reason) for an exception that ends the command; None to let it through."""
    if isinstance(exc, ConfigError):
        return 2, f"config error: {exc}"
    if isinstance(exc, ProfileError):  # a GPU profile on a machine or install that cannot run it
        return 2, str(exc)
    if isinstance(exc, stops.StopRequested):
        return exc.exit_code, str(exc)
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        name = stops.SIGNALS.last_signal()
        if isinstance(exc, SystemExit) and name is None:
            if exc.code != signal.SIGTERM:
                return None  # argparse's exits and explicit sys.exit calls keep their code
            name = "SIGTERM"  # ray.init's own handler, in place until ours are put back, exits with 15
        name = name or "SIGINT"  # a KeyboardInterrupt before the handlers were installed
        return stops.exit_code_of(name), f"stopped at once by {name}"
    name = stops.SIGNALS.requested()
    if name is not None:  # e.g. Ctrl-C reached the actors too: the stop is the reason, the error its echo
        return stops.exit_code_of(name), f"stopped by {name} ({_one_line(exc)})"
    remote = _remote_error(exc)
    hint = "" if _is_ours(remote[0] if remote else exc) else " (--debug shows the traceback)"
    return 1, f"error: {_one_line(exc)}{hint}"


def _shutdown_ray() -> bool:
    """Stop the Ray instance this process started (or leave the cluster it joined), so that no raylet,
    worker, agent or vLLM engine outlives the command. False when the cluster's GCS is gone (a scancel
    stops the Ray nodes with the driver): a Ray client then cannot disconnect, and both ray.shutdown and
    Ray's exit handler would wait out a reconnect timeout of a minute, past Slurm's KillWait."""
    ray = sys.modules.get("ray")
    if ray is None:
        return True
    connected = True
    try:
        if ray.is_initialized():
            from launcher.cluster import gcs_reachable

            connected = gcs_reachable()
        if not connected:
            logging.getLogger(__name__).warning("the Ray cluster is gone: exiting without disconnecting")
        # A node half started when a signal cut ray.init short is not "initialized", yet has processes.
        elif ray.is_initialized() or getattr(ray._private.worker, "_global_node", None) is not None:
            ray.shutdown(wait_for_processes=True)
        from launcher.cluster import stop_ray_descendants

        stop_ray_descendants()
    except BaseException as exc:  # a second Ctrl-C during clean-up must not end in a traceback
        print(f"medvlm-r1: Ray shutdown incomplete: {_one_line(exc)}", file=sys.stderr)
    return connected


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    # Overrides may follow options too (`eval CKPT --out D key=value`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
    try:
        code = _run(args)
    finally:
        stops.SIGNALS.shield()  # the signal that forwards a scancel must not cut the clean-up short
        disconnected = _shutdown_ray()
    if not disconnected:  # skip Ray's exit handler, which would wait for the gone GCS
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args) -> int:
    """The command's exit code; an error that ends it becomes one line on stderr."""
    try:
        return args.func(args)
    except BaseException as exc:
        failure = _failure(exc)
        if failure is None:
            raise
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"medvlm-r1: {failure[1]}", file=sys.stderr)
        return failure[0]


if __name__ == "__main__":
    sys.exit(main())
