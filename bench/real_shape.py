"""The paper's run end to end on CPU at Qwen2-VL-2B's real widths, its depth cut: memory, time, sync, numerics.

`medvlm-r1 train configs/medvlm_r1_2b.yaml` (launcher.train_loop.run_training, in this process, which is the
driver) with only what a 2-core CPU machine needs changed: the model is `make-tiny-model --like qwen2-vl-2b`
with --layers text layers and --vision-depth vision blocks (random weights, saved bf16, loaded fp32; built
once under runs/real-shape/models/), fp32, synthetic scans of --image-size px (644: the processor resizes
them to 616 x 616 inside max_pixels 401408, 484 image tokens), 2 learner ranks under ZeRO-3, 1 rollout worker,
2 prompts x G 4 per step, micro-batches of 1 sample (the config has 4), no evaluation, no checkpoints, every
actor on half a core, the engine in the rollout worker's process, a KV cache of a quarter GiB, DeepSpeed's
reduce bucket at 5e7 elements and glibc's mmap threshold fixed at 1 MiB (MALLOC_ENV): what fits 24 GiB. The paper's
prompt, rewards (format + accuracy_paper), beta (a ZeRO-3 reference), 512 new tokens and gradient
checkpointing stay. A random model rarely samples the end-of-turn token, so nearly every completion runs to
512 tokens: the cost of the paper's longest samples.

Prints and writes (--out) the prompt's shape (image tokens and prompt length from the processor on the
run's records), each step's phases, completion lengths, sync bytes and learner/engine log-prob agreement,
the peak memory of every process (bench/proc_memory.py: the learner ranks, the rollout worker, its vLLM
engine, the driver, Ray's own), and an estimate for the full 28 layers / 32 blocks (see `extrapolate`).
Usage:
    python bench/real_shape.py [--steps 3] [--layers 1] [--vision-depth 1] [--image-size 644]
        [--out runs/real_shape.json] [--baseline OTHER_DEPTH.json] [key=value ...]
    python bench/real_shape.py --report runs/real_shape.json --baseline OTHER_DEPTH.json   (refit, run nothing)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from proc_memory import GIB, TreeMemorySampler  # noqa: E402
from real_shape_estimate import depth_parameters, extrapolate, print_extrapolation  # noqa: E402

CONFIG = ROOT / "configs" / "medvlm_r1_2b.yaml"
CACHE = ROOT / "runs" / "real-shape"
KV_HEADS, HEAD_DIM = 2, 128  # Qwen2-VL-2B's text attention (medvqa/tiny_model.py), for the KV cache size


def cpu_overrides(args, model_dir: Path, run_dir: Path) -> list[str]:
    """What the paper's config needs changed to run here (the caller's own overrides come after)."""
    return [
        "cluster.device=cpu", "learner.precision=fp32", "cluster.cpus_per_actor=0.5", "cluster.pin_cpus=false",
        "model.build_tiny_if_missing=false", f"model.path={model_dir}",
        "data.source=synthetic", "data.path=null", "data.eval_path=null", f"data.image_size={args.image_size}",
        f"data.num_train={max(8, 2 * args.steps)}", "data.num_eval_per_modality=1",
        "learner.num_ranks=2", "learner.zero_stage=3", "learner.micro_batch_size=1",
        "learner.gradient_checkpointing=true", "learner.zero_bucket_elements=50000000",  # 5e8: 1.3 GB a rank here
        "rollout.num_workers=1", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=512",
        "rollout.enforce_eager=true", "rollout.engine_in_process=true",  # the engine in the worker: 2 processes fewer
        f"train.steps={args.steps}", "train.eval_at_end=false", "train.eval_every=0", "train.save_every=0",
        "train.checkpoint_every=0", "train.resume=false",
        "logging.wandb=false", "logging.progress_bar=false", f"logging.run_dir={run_dir}"]


def load_run_config(args, model_dir: Path, run_dir: Path):
    """The config and its overrides, rollout.kv_cache_gib sized for every sequence of a step at
    max_model_len, twice over, in quarters of a GiB (unless the caller set it)."""
    from launcher.config import load_config

    base = cpu_overrides(args, model_dir, run_dir)
    cfg = load_config(str(CONFIG), base + args.overrides)
    if any(o.startswith("rollout.kv_cache_gib=") for o in args.overrides):
        return cfg, base + args.overrides
    r = cfg.rollout
    per_token = 2 * args.layers * KV_HEADS * HEAD_DIM * 4  # keys and values, fp32
    sequences = math.ceil(r.prompts_per_step / r.num_workers) * r.group_size
    overrides = base + [f"rollout.kv_cache_gib={max(1, math.ceil(8 * sequences * r.max_model_len * per_token / GIB)) / 4}",
                        *args.overrides]
    return load_config(str(CONFIG), overrides), overrides


def model_folder(layers: int, blocks: int) -> Path:
    """The random real-shape checkpoint of this depth, built once (in a child process, so that the
    driver's memory stays the driver's) and reused."""
    out = CACHE / "models" / f"qwen2-vl-2b-L{layers}-V{blocks}"
    if (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[real-shape] building {out} (make-tiny-model --like qwen2-vl-2b)", flush=True)
    subprocess.run([sys.executable, "-m", "launcher", "make-tiny-model", str(tmp), "--like", "qwen2-vl-2b",
                    "--layers", str(layers), "--vision-depth", str(blocks)], cwd=ROOT, check=True)
    tmp.rename(out)
    return out


def prompt_shape(cfg) -> dict:
    """Image tokens and prompt lengths of the run's training records, from the learner's own encoder."""
    from launcher.data import build_datasets
    from learner.model_inputs import encode_prompt
    from medvqa.prompt import load_processor

    records, _ = build_datasets(cfg.data)
    processor = load_processor(cfg.model.path, cfg.model.min_pixels, cfg.model.max_pixels)
    encoded = [encode_prompt(r, processor) for r in records]
    image_tokens = sorted({e.input_ids.count(processor.image_token_id) for e in encoded})
    lengths = [len(e.input_ids) for e in encoded]
    t, h, w = encoded[0].image_grid_thw[0].tolist()
    patch = processor.image_processor.patch_size
    return {"image_px": cfg.data.image_size, "resized_px": [h * patch, w * patch], "vision_patches": t * h * w,
            "image_tokens": image_tokens[0] if len(image_tokens) == 1 else image_tokens,
            "prompt_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
            "records": len(records)}


def remember_actor_pids(pids: dict):
    """Wrap launcher.controller.Controller.start (for this run only) to learn each learner rank's pid and
    the rollout worker's processes; returns the undo. Without them, processes are told apart by title."""
    import ray

    from launcher.controller import Controller

    original = Controller.start

    def start(cfg, model_path, faults_dir=None):
        controller = original(cfg, model_path, faults_dir)
        pids["started"] = time.perf_counter()
        try:
            calls = [a.__ray_call__.remote(lambda self: (self.rank, os.getpid())) for a in controller.learners.actors]
            pids["learners"] = dict(ray.get(calls, timeout=120))
            pids["workers"] = [list(p) for p in controller.worker_pids]
        except Exception as exc:  # the measurement falls back on process titles
            pids["error"] = repr(exc)
        return controller

    Controller.start = start
    return lambda: setattr(Controller, "start", original)


class StepEcho:
    """Called by the sampler every few seconds: a line per new step row, and the memory every minute."""

    def __init__(self, metrics: Path, t0: float):
        self.metrics, self.t0, self.seen, self.last_mem = metrics, t0, 0, t0
        self.sampler = None

    def __call__(self) -> None:
        now = time.perf_counter()
        if self.sampler is not None and now - self.last_mem >= 60:
            self.last_mem = now
            s = self.sampler
            print(f"[real-shape] {now - self.t0:6.0f} s: process tree RSS peak {s.total_rss / GIB:.1f} GiB, "
                  f"machine used {s.machine_used_peak / GIB:.1f} GiB (peak)", flush=True)
        if not self.metrics.exists():
            return
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if '"reward/total"' in line]
        for r in rows[self.seen:]:
            print(f"[real-shape] {now - self.t0:6.0f} s: step {r['step']}: {r['time/step_s']:.1f} s (generate "
                  f"{r['time/generate_s']:.1f}, train {r['time/train_s']:.1f}, sync {r['time/sync_s']:.1f}); "
                  f"completions {r['response_length/mean']:.0f} tokens; logprob diff mean "
                  f"{r['logprob_diff/mean_abs']:.2e} max {r['logprob_diff/max_abs']:.2e}", flush=True)
        self.seen = len(rows)


# glibc's mmap threshold grows to 32 MB as large tensors are freed, and freed blocks below it stay in the heap; fixed
# at 1 MiB (inherited by the Ray processes started here), every larger tensor goes back to the system when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run(cfg, echo: StepEcho) -> dict:
    """The training run under the memory sampler; what it measured, an `error` if it failed."""
    import ray

    for key, value in MALLOC_ENV.items():
        os.environ.setdefault(key, value)

    from launcher.train_loop import run_training

    pids: dict = {}
    undo = remember_actor_pids(pids)
    out: dict = {"error": None}
    start = time.perf_counter()
    with TreeMemorySampler(on_slow_tick=echo) as sampler:
        echo.sampler = sampler
        try:
            result = run_training(cfg)
            out["summary"] = result.summary
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc()
            traceback.print_exc()
        finally:
            undo()
            ray.shutdown()
    out["wall_s"] = time.perf_counter() - start
    out["startup_s"] = pids.pop("started", start) - start
    out["memory"] = memory_by_role(sampler, pids)
    return out


def _role(sampler, pids: list[int]) -> dict:
    """The role's peaks, its processes' peaks per title (Ray method), and its RSS every slow sample."""
    procs = sorted((sampler.peaks[p] for p in pids if p in sampler.peaks), key=lambda p: -p.rss)
    by_title = lambda p: {t: round(v / GIB, 3) for t, v in sorted(p.rss_by_title.items(), key=lambda i: -i[1])[:6]}  # noqa: E731
    return {"peak_rss_gib": sum(p.rss for p in procs) / GIB, "peak_pss_gib": sum(p.pss for p in procs) / GIB,
            "processes": [{"pid": p.pid, "title": p.title, "peak_rss_gib": p.rss / GIB, "peak_pss_gib": p.pss / GIB,
                           "peak_during": p.title_at_peak(), "peak_rss_gib_by_title": by_title(p)} for p in procs],
            "rss_gib_timeline": [(round(t, 1), round(sum(rss.get(p, 0) for p in pids) / GIB, 3))
                                 for t, _, rss in sampler.timeline]}


def memory_by_role(sampler, pids: dict) -> dict:
    """Peaks per actor. A role of several processes gives the sum of their peaks (an upper bound of
    their peak together); RSS counts shared pages (torch's libraries) in every process, PSS shares them."""
    by_class = lambda name: [p.pid for p in sampler.peaks.values() if p.ray_class() == name]  # noqa: E731
    learners = pids.get("learners") or dict(enumerate(by_class("LearnerRank")))
    worker = (pids.get("workers") or [by_class("RolloutWorker")])[0][:1]
    # vLLM's engine core and model processes (none when rollout.engine_in_process; helpers that only
    # compile a kernel come and go with no memory to speak of)
    engine = [p for p in sampler.below(worker[0]) if sampler.peaks[p].rss > 64 * 2**20] if worker else []
    roles = {f"learner rank {rank}": _role(sampler, [pid]) for rank, pid in sorted(learners.items())}
    roles["rollout worker 0"] = _role(sampler, worker)
    roles["vLLM engine of worker 0"] = _role(sampler, engine)
    roles["driver"] = _role(sampler, [sampler.root.pid])
    named = {sampler.root.pid, *learners.values(), *worker, *engine}
    roles["Ray's own processes"] = _role(sampler, [p for p in sampler.peaks if p not in named])
    roles["Ray's own processes"]["processes"] = roles["Ray's own processes"]["processes"][:5]
    return {"roles": roles, "tree_rss_peak_gib": sampler.total_rss / GIB, "tree_pss_peak_gib": sampler.total_pss / GIB,
            "machine_used_start_gib": sampler.machine_used_start / GIB,
            "machine_used_peak_gib": sampler.machine_used_peak / GIB, "samples": sampler.samples,
            "interval_s": sampler.interval_s, "actor_pids": pids,
            "machine_used_gib_timeline": [(round(t, 1), round(used / GIB, 3)) for t, used, _ in sampler.timeline]}


STEP_KEYS = {"generate_s": "time/generate_s", "engine_generate_s": "time/rollout_s", "train_s": "time/train_s",
             "learner_s": "time/learner_s", "sync_s": "time/sync_s", "step_s": "time/step_s",
             "sync_bytes": "sync/bytes", "completion_mean": "response_length/mean",
             "completion_max": "response_length/max", "truncated_fraction": "response_length/truncated_fraction",
             "logprob_diff_mean": "logprob_diff/mean_abs", "logprob_diff_max": "logprob_diff/max_abs",
             "loss": "loss", "kl": "kl", "grad_norm": "grad_norm", "reward": "reward/total"}


def step_rows(run_dir: Path) -> list[dict]:
    from launcher.metrics import read_rows

    out = []
    for r in (r for r in read_rows(run_dir / "metrics.jsonl") if "reward/total" in r):
        row = {"step": r["step"], **{k: r.get(key) for k, key in STEP_KEYS.items()}}
        row["waiting_s"] = row["step_s"] - row["generate_s"] - row["learner_s"] - row["sync_s"]
        out.append(row)
    return out


def phase_means(steps: list[dict]) -> dict:
    """Means over the steps after the first (the first pays for warm caches), or the one step."""
    rows = steps[1:] or steps
    keys = ("generate_s", "engine_generate_s", "train_s", "learner_s", "sync_s", "waiting_s", "step_s")
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys} | {"steps_averaged": [r["step"] for r in rows]}


# ---- the report ----------------------------------------------------------------------------------------------


def print_report(res: dict) -> None:
    m, pr = res["model"], res["prompt"]
    print(f"\n== real-shape run: Qwen2-VL-2B widths, {m['layers']} text layers, {m['vision_depth']} vision blocks "
          f"({m['parameters']:,} parameters; full depth {m['full_parameters']:,}) ==")
    if "layout" in res:
        print(describe(res["layout"]))
    steps_s = (res.get("summary") or {}).get("time/grpo_s", float("nan"))
    print(f"wall {res['wall_s']:.0f} s: start-up {res['startup_s']:.0f} s, {len(res.get('steps', []))} GRPO steps "
          f"{steps_s:.0f} s, final save and teardown {res['wall_s'] - res['startup_s'] - steps_s:.0f} s "
          f"(load average {res['load_average_before'][0]:.2f} before, {res['load_average_after'][0]:.2f} after)")
    print(f"prompt: {pr['image_px']} px scan -> {pr['resized_px'][0]} x {pr['resized_px'][1]} px, "
          f"{pr['vision_patches']} patches, {pr['image_tokens']} image tokens; prompt {pr['prompt_tokens']['min']}-"
          f"{pr['prompt_tokens']['max']} tokens (mean {pr['prompt_tokens']['mean']:.1f}) over {pr['records']} records")
    if res.get("steps"):
        print(f"{'step':>4} {'generate':>9} {'(engine)':>9} {'learner':>8} {'train':>8} {'sync':>7} {'waiting':>8} "
              f"{'step s':>8} {'compl mean/max':>15} {'trunc':>6} {'lp diff mean':>13} {'lp diff max':>12} {'loss':>10} "
              f"{'grad norm':>10}")
        for s in res["steps"]:
            print(f"{s['step']:4d} {s['generate_s']:9.1f} {s['engine_generate_s']:9.1f} {s['learner_s']:8.1f} "
                  f"{s['train_s']:8.1f} {s['sync_s']:7.1f} {s['waiting_s']:8.1f} {s['step_s']:8.1f} "
                  f"{s['completion_mean']:9.1f}/{s['completion_max']:<5d} {s['truncated_fraction']:6.2f} "
                  f"{s['logprob_diff_mean']:13.2e} {s['logprob_diff_max']:12.2e} {s['loss']:10.3e} {s['grad_norm']:10.3e}")
        mn, sync = res["means"], max(res["steps"], key=lambda s: s["sync_bytes"] or 0)
        print(f"mean of steps {mn['steps_averaged']}: step {mn['step_s']:.1f} s = generate {mn['generate_s']:.1f} + "
              f"learner {mn['learner_s']:.1f} + sync {mn['sync_s']:.1f} + waiting {mn['waiting_s']:.1f}")
        print(f"sync: {sync['sync_bytes'] / 1e9:.3f} GB per update in {sync['sync_s']:.1f} s (step {sync['step']}; "
              f"{sync['sync_bytes'] / 1e9 / max(sync['sync_s'], 1e-9):.2f} GB/s)")
    print_memory(res["memory"])
    if res.get("extrapolation"):
        print_extrapolation(res["extrapolation"])
    if res["error"]:
        print(f"\nFAILED: {res['error'].splitlines()[0]}")


def print_memory(mem: dict) -> None:
    print(f"memory, peak over the run (sampled every {mem['interval_s']} s; RSS counts shared libraries in "
          "every process, PSS shares them out):")
    for name, role in mem["roles"].items():
        if not role["processes"]:
            print(f"  {name:26s} none (in the rollout worker's process)" if "engine" in name else f"  {name:26s} none")
            continue
        top = role["processes"][0]
        print(f"  {name:26s} RSS {role['peak_rss_gib']:6.2f} GiB  PSS {role['peak_pss_gib']:6.2f} GiB  "
              f"({len(role['processes'])} processes; largest {top['pid']}, peak during {top['peak_during'][:48]})")
    print(f"  all processes at one instant: RSS {mem['tree_rss_peak_gib']:.2f} GiB, PSS {mem['tree_pss_peak_gib']:.2f}"
          f" GiB; machine used {mem['machine_used_start_gib']:.2f} -> {mem['machine_used_peak_gib']:.2f} GiB (peak)")


def layout(cfg) -> dict:
    """The settings that decide memory and time, as the run had them."""
    lc, r = cfg.learner, cfg.rollout
    return {"learner_ranks": lc.num_ranks, "zero_stage": lc.zero_stage, "precision": lc.precision,
            "micro_batch_size": lc.micro_batch_size, "reference_model": cfg.grpo.beta > 0, "beta": cfg.grpo.beta,
            "rollout_workers": r.num_workers, "engine_in_process": r.engine_in_process, "kv_cache_gib": r.kv_cache_gib,
            "prompts_per_step": r.prompts_per_step, "group_size": r.group_size, "max_new_tokens": r.max_new_tokens,
            "cpus_per_actor": cfg.cluster.cpus_per_actor, "pin_cpus": cfg.cluster.pin_cpus}


def describe(lay: dict) -> str:
    return (f"{lay['precision']}, {lay['learner_ranks']} learner rank(s) ZeRO-{lay['zero_stage']} "
            f"({'with' if lay['reference_model'] else 'no'} reference), micro-batch {lay['micro_batch_size']}, "
            f"{lay['rollout_workers']} engine ({'in' if lay['engine_in_process'] else 'own'} process, KV "
            f"{lay['kv_cache_gib']} GiB), {lay['prompts_per_step']} prompts x G {lay['group_size']}, "
            f"{lay['max_new_tokens']} new tokens, {lay['cpus_per_actor']} CPU per actor")


def git_state() -> dict:
    """The commit and the files changed from it: what code the run measured."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"head": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain").splitlines()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="GRPO steps (the first pays for warm-up; means leave it out)")
    p.add_argument("--layers", type=int, default=1, help="text decoder layers (published: 28)")
    p.add_argument("--vision-depth", type=int, default=1, help="vision blocks (published: 32)")
    p.add_argument("--image-size", type=int, default=644, help="synthetic scan side, a multiple of 28")
    p.add_argument("--out", default="runs/real_shape.json", help="results as JSON")
    p.add_argument("--baseline", default=None, help="this script's JSON from a run at other depths: fit the estimate")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="run nothing: print this results file again, its estimate refitted (with --baseline)")
    p.add_argument("--keep-policy", action="store_true", help="keep the run's final/ policy (GBs at this shape)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied last")
    return p.parse_intermixed_args(argv)


def main(argv: list[str]) -> int:
    import logging

    from medvqa.tiny_model import parameter_count, real_shape_config

    args = parse_args(argv)
    if args.report:
        return report_again(Path(args.report), args.baseline)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_dir = model_folder(args.layers, args.vision_depth)
    run_dir = CACHE / f"run-L{args.layers}-V{args.vision_depth}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg, overrides = load_run_config(args, model_dir, run_dir)
    res = {"command": [sys.executable, *sys.argv], "config": str(CONFIG.relative_to(ROOT)), "overrides": overrides,
           "model": {"path": str(model_dir), "layers": args.layers, "vision_depth": args.vision_depth,
                     "parameters": parameter_count(real_shape_config(layers=args.layers, vision_depth=args.vision_depth)),
                     "full_parameters": parameter_count(real_shape_config())},
           "parameters": depth_parameters(), "prompt": prompt_shape(cfg), "load_average_before": os.getloadavg(),
           "git": git_state(), "layout": layout(cfg)}
    res.update(run(cfg, StepEcho(run_dir / "metrics.jsonl", time.perf_counter())))
    res["load_average_after"] = os.getloadavg()
    if (run_dir / "metrics.jsonl").exists() and step_rows(run_dir):
        res["steps"] = step_rows(run_dir)
        res["means"] = phase_means(res["steps"])
    if res.get("steps") and not res["error"]:  # a run cut short has no steady state to scale
        res["extrapolation"] = extrapolate(res, cfg, json.loads(Path(args.baseline).read_text()) if args.baseline else None)
    if not args.keep_policy:
        shutil.rmtree(run_dir / "final", ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print_report(res)
    print(f"\nresults: {out}; run folder: {run_dir}")
    return 1 if res["error"] else 0


def report_again(path: Path, baseline: str | None) -> int:
    from launcher.config import load_config

    res = json.loads(path.read_text())
    cfg = load_config(str(CONFIG), res["overrides"])
    res.setdefault("layout", layout(cfg))
    res.pop("extrapolation", None)
    if res.get("steps") and not res["error"]:
        res["extrapolation"] = extrapolate(res, cfg, json.loads(Path(baseline).read_text()) if baseline else None)
    path.write_text(json.dumps(res, indent=2, default=str))
    print_report(res)
    return 1 if res["error"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
