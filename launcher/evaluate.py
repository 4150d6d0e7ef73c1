"""Greedy evaluation on held-out sets: per-record rows, accuracy per set, format compliance, length."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from launcher.actor_group import ActorGroup
from medvqa.record import MedVQARecord


# Runs `generate_greedy` with one args tuple per worker (None: none for that worker); returns the
# results of the workers given args, in worker order. A training run passes one that replaces a worker
# that dies or misses its deadline and runs its shard again (launcher/controller.py:Controller.evaluate).
ShardRunner = Callable[[list, str], list]


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous shards whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def greedy_completions(workers: ActorGroup, records: list[MedVQARecord], max_new_tokens: int,
                       run: Optional[ShardRunner] = None) -> list:
    """(text, num_tokens, finish_reason) per record, the records spread over the workers in order."""
    shards = split_evenly(records, len(workers))
    args, doing = [(s, max_new_tokens) if s else None for s in shards], f"evaluating {len(records)} records"
    results = run(args, doing) if run else workers.call_each("generate_greedy", args, doing=doing)
    return [res for shard in results for res in shard]


def score_record(record: MedVQARecord, text: str, num_tokens: int, finish_reason: str) -> dict:
    """One output row; the answer is extracted exactly as the accuracy reward does."""
    from medvqa.prompt import question_text
    from rewards import extract_answer, format_reward

    chosen = extract_answer(text, record.options)
    return {"id": record.id, "set": record.modality, "source": record.source, "prompt": question_text(record),
            "completion": text, "extracted": chosen, "answer": record.answer, "correct": chosen == record.answer,
            "format_ok": format_reward(text) == 1.0, "num_tokens": num_tokens, "finish_reason": finish_reason}


def summarize_rows(rows: list[dict]) -> dict:
    n = len(rows)
    return {"n": n, "accuracy": sum(r["correct"] for r in rows) / n,
            "format_rate": sum(r["format_ok"] for r in rows) / n,
            "mean_length": sum(r["num_tokens"] for r in rows) / n}


def evaluate_sets(workers: ActorGroup, eval_sets: dict, max_new_tokens: int,
                  run: Optional[ShardRunner] = None) -> tuple[dict, list[dict]]:
    """({set name: summary}, rows); also an "overall" summary pooling every set, as the paper reports."""
    results, all_rows = {}, []
    for name, records in eval_sets.items():
        outputs = greedy_completions(workers, records, max_new_tokens, run)
        rows = [dict(score_record(r, *o), set=name) for r, o in zip(records, outputs)]
        results[name] = summarize_rows(rows)
        all_rows += rows
    if len(eval_sets) > 1:
        results["overall"] = summarize_rows(all_rows)
    return results, all_rows


def eval_metrics(results: dict) -> dict:
    return {f"eval/{name}/{k}": v for name, r in results.items() for k, v in r.items() if k != "n"}


def write_outputs(out_dir: Path, results: dict, rows: list[dict], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out_dir / "summary.json").write_text(json.dumps({**meta, "results": results}, indent=2))
