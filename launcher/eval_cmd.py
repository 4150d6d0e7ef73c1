"""`medvlm-r1 eval CHECKPOINT`: greedy decoding with vLLM over the config's evaluation sets."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from launcher import cluster, stops
from launcher.config import Config
from launcher.data import build_eval_sets
from launcher.evaluate import evaluate_sets, write_outputs


def run_eval(cfg: Config, checkpoint: str, out_dir: Path | None) -> dict:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=checkpoint))
    if not Path(checkpoint).exists() and Path(checkpoint).is_absolute():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
    out_dir = out_dir or Path(checkpoint) / "eval"
    data = build_eval_sets(cfg.data)
    eval_sets = data.evals
    if not eval_sets:
        raise ValueError(f"no evaluation records of modalities {list(cfg.data.eval_modalities)}")
    cluster.start_ray(cfg)
    stops.SIGNALS.reinstall()  # ray.init replaced the SIGTERM handler
    placement = cluster.place(cfg, with_learners=False)  # the training placement, without learner bundles
    workers = cluster.start_workers(cfg, placement, checkpoint)
    try:
        t0 = time.perf_counter()
        results, rows = evaluate_sets(workers, eval_sets, cfg.rollout.max_new_tokens)
        meta = {"checkpoint": checkpoint, "decoding": "greedy", "max_new_tokens": cfg.rollout.max_new_tokens,
                "seconds": time.perf_counter() - t0, "data": data.summary()}
        write_outputs(out_dir, results, rows, meta)
    finally:
        # After a stop signal no graceful call: an engine still starting would hold it up for a minute.
        workers.shutdown(None if stops.SIGNALS.last_signal() else "shutdown")
        placement.remove()
    return {"results": results, "out_dir": str(out_dir)}
