"""`medvlm-r1`: train, sft, eval, report, make-tiny-model."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from launcher.config import ConfigError, load_config
from protocol.profile import ProfileError


def _cmd_train(args) -> int:
    from launcher import stops
    from launcher.train_loop import print_summary, run_training

    cfg = load_config(args.config, args.overrides)
    stops.install_handlers()
    try:
        result = run_training(cfg)
    except stops.StopRequested as stop:
        print(f"medvlm-r1: {stop}", file=sys.stderr)
        return stop.exit_code
    print_summary(result)
    return 0


def _cmd_sft(args) -> int:
    from launcher.sft_loop import print_summary, run_sft

    cfg = load_config(args.config, args.overrides)
    print_summary(run_sft(cfg))
    return 0


def _cmd_make_tiny_model(args) -> int:
    from medvqa.tiny_model import build_tiny_model

    out = build_tiny_model(args.out_dir, seed=args.seed)
    print(f"tiny Qwen2-VL written to {out}")
    return 0


def _cmd_eval(args) -> int:
    from launcher.eval_cmd import run_eval

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
    p = argparse.ArgumentParser(prog="medvlm-r1", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="GRPO training run: medvlm-r1 train CONFIG [key=value ...]")
    t.add_argument("config", help="YAML config, e.g. configs/tiny_cpu.yaml")
    t.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. learner.lr=5e-7)")
    t.set_defaults(func=_cmd_train)
    s = sub.add_parser("sft", help="supervised baseline on the same records: medvlm-r1 sft CONFIG [key=value ...]")
    s.add_argument("config", help="YAML config with an sft section, e.g. configs/tiny_cpu_sft.yaml")
    s.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. sft.target=letter)")
    s.set_defaults(func=_cmd_sft)
    m = sub.add_parser("make-tiny-model", help="build the tiny random Qwen2-VL checkpoint used by tests and the demo")
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_cmd_make_tiny_model)
    e = sub.add_parser("eval", help="greedy evaluation of a checkpoint on the config's held-out sets")
    e.add_argument("checkpoint", help="a saved policy, the tiny model folder, or a Hugging Face model path")
    e.add_argument("--config", default=None, help="YAML config for data/rollout settings (default: built-ins)")
    e.add_argument("--out", default=None, help="output folder (default: <checkpoint>/eval)")
    e.add_argument("overrides", nargs="*", help="config overrides as key=value")
    e.set_defaults(func=_cmd_eval)
    r = sub.add_parser("report", help="Markdown and HTML report of a run directory")
    r.add_argument("run_dir")
    r.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                   help="other runs (e.g. SFT) for one table: base, SFT and GRPO rows per modality")
    r.add_argument("--base", default=None, metavar="EVAL_DIR",
                   help="base-model evaluation (medvlm-r1 eval --out) instead of the GRPO run's step 0")
    r.add_argument("--out", default=None, help="folder for comparison.md/.html/.png (default: RUN_DIR)")
    r.set_defaults(func=_cmd_report)
    return p


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
        return args.func(args)
    except ConfigError as exc:
        print(f"medvlm-r1: config error: {exc}", file=sys.stderr)
        return 2
    except ProfileError as exc:
        print(f"medvlm-r1: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
