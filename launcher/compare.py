"""`medvlm-r1 report RUN --compare OTHER ...`: the paper's table, the base model, SFT and GRPO side by side.

Accuracies are counted from each evaluation's per-record predictions.jsonl, not from its summary,
and only evaluations of the very same records are compared: a row evaluated on other records (or a
run configured with other data) is refused with the difference named, since its numbers would
measure another test.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # no screen on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

from launcher.report import PAPER_ORDER, markdown_to_html, train_modalities  # noqa: E402

METHOD_ORDER = ("sft", "grpo")  # rows after the base model, as in the paper's table
ROW_KEYS = ("id", "set", "answer", "prompt", "correct")


class ComparisonError(ValueError):
    """Evaluations that cannot share one table; the message names the difference."""


@dataclasses.dataclass
class EvalRow:
    """One row of the table: one evaluation folder, counted record by record."""
    label: str  # "base", "SFT", "GRPO" (with the run's name when two runs share a method)
    detail: str  # where the row comes from, e.g. "step 200 of sft-run"
    folder: Path
    records: dict[str, dict[str, tuple]]  # set -> record id -> (answer, prompt)
    correct: dict[str, int]  # set -> records answered correctly

    def counts(self, name: str) -> tuple[int, int]:
        """(correct, n) of a set, or of every set pooled for "overall" (as the paper pools its 900 items)."""
        if name == "overall":
            return sum(self.correct.values()), sum(len(v) for v in self.records.values())
        return self.correct[name], len(self.records[name])

    def accuracy(self, name: str) -> float:
        right, n = self.counts(name)
        return right / n


def read_eval_folder(label: str, detail: str, folder: Path) -> EvalRow:
    path = Path(folder) / "predictions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not an evaluation folder (eval/stepNNNNNN or eval --out)")
    records: dict[str, dict[str, tuple]] = {}
    correct: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ComparisonError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ComparisonError(f"{path}:{lineno}: prediction row lacks {missing}")
        records.setdefault(row["set"], {})[row["id"]] = (row["answer"], row["prompt"])
        correct[row["set"]] = correct.get(row["set"], 0) + bool(row["correct"])
    if not records:
        raise ComparisonError(f"{path} holds no predictions")
    return EvalRow(label, detail, Path(folder), records, correct)


def run_method(run_dir: Path) -> str:
    """"sft" or "grpo" from the run's summary.json; runs written before the field existed are GRPO runs."""
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()).get("method", "grpo") if path.exists() else "grpo"


def eval_folders(run_dir: Path) -> dict[int, Path]:
    """{step: folder} of the run's evaluations that hold per-record predictions."""
    folders = {int(p.parent.name.removeprefix("step")): p.parent
               for p in Path(run_dir).glob("eval/step*/predictions.jsonl")}
    if not folders:
        raise FileNotFoundError(f"{run_dir} has no eval/step*/predictions.jsonl: no evaluation to compare")
    return folders


def collect_rows(runs: list[Path], base: Optional[Path]) -> list[EvalRow]:
    """The base row (a given evaluation, or step 0 of the first GRPO run), then each run's last evaluation."""
    methods = {run: run_method(run) for run in runs}
    ordered = sorted(runs, key=lambda r: METHOD_ORDER.index(methods[r]) if methods[r] in METHOD_ORDER else 99)
    if base is not None:
        rows = [read_eval_folder("base", "given evaluation", base)]
    else:
        source = next((r for r in ordered if methods[r] == "grpo"), ordered[0])
        steps = eval_folders(source)
        if 0 not in steps:
            raise ComparisonError(f"{source} has no step-0 evaluation to serve as the base row; "
                                  f"pass --base EVAL_DIR (from medvlm-r1 eval --out EVAL_DIR)")
        rows = [read_eval_folder("base", f"step 0 of {source.name}", steps[0])]
    labels = [methods[r].upper() for r in ordered]
    for run, label in zip(ordered, labels):
        steps = eval_folders(run)
        last = max(steps)
        if last == 0:
            raise ComparisonError(f"{run} has no evaluation after step 0")
        name = f"{label} ({run.name})" if labels.count(label) > 1 else label
        rows.append(read_eval_folder(name, f"step {last} of {run.name}", steps[last]))
    return rows


def _first(ids, limit: int = 3) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def record_difference(a: EvalRow, b: EvalRow) -> Optional[str]:
    """What differs between the record sets of two evaluations, or None when they are the same."""
    if set(a.records) != set(b.records):
        return f"evaluation sets {sorted(a.records)} in {a.folder} but {sorted(b.records)} in {b.folder}"
    for name in a.records:
        ra, rb = a.records[name], b.records[name]
        only_a, only_b = set(ra) - set(rb), set(rb) - set(ra)
        if only_a or only_b:
            return (f"set {name}: {len(only_a)} records only in {a.folder} ({_first(only_a) or '-'}), "
                    f"{len(only_b)} only in {b.folder} ({_first(only_b) or '-'})")
        for rid in sorted(ra):
            if ra[rid][0] != rb[rid][0]:
                return f"set {name}, record {rid}: answer {ra[rid][0]} in {a.folder} but {rb[rid][0]} in {b.folder}"
            if ra[rid][1] != rb[rid][1]:
                return f"set {name}, record {rid}: another question in {b.folder} than in {a.folder}"
    return None


def _config_section(run: Path) -> Optional[dict]:
    """What decides a run's records and its evaluation: the data section and the completion budget."""
    path = run / "config.yaml"
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(path))
    flat = {f"data.{k}": v for k, v in (cfg.get("data") or {}).items()}
    flat["rollout.max_new_tokens"] = (cfg.get("rollout") or {}).get("max_new_tokens")
    return flat


def config_difference(runs: list[Path]) -> Optional[str]:
    sections = [(run, s) for run in runs if (s := _config_section(run)) is not None]
    for run, section in sections[1:]:
        ref_run, ref = sections[0]
        keys = sorted(k for k in set(ref) | set(section) if ref.get(k) != section.get(k))
        if keys:
            return "; ".join(f"{k}: {ref.get(k)!r} in {ref_run} but {section.get(k)!r} in {run}" for k in keys)
    return None


def check_comparable(rows: list[EvalRow], runs: list[Path]) -> None:
    for row in rows[1:]:
        diff = record_difference(rows[0], row)
        if diff:
            raise ComparisonError(f"'{rows[0].label}' and '{row.label}' were evaluated on different records: {diff}")
    diff = config_difference(runs)
    if diff:
        raise ComparisonError(f"the runs were configured with different data: {diff}")


def column_names(row: EvalRow) -> list[str]:
    return [n for n in PAPER_ORDER if n in row.records] + sorted(n for n in row.records if n not in PAPER_ORDER)


def comparison_table(rows: list[EvalRow], train_sets: list[str]) -> list[str]:
    """Markdown: a row per model, accuracy (%) per modality and pooled, then the change between each pair."""
    names = column_names(rows[0])
    domain = lambda n: "" if not train_sets else "in domain, " if n in train_sets else "out of domain, "  # noqa: E731
    cols = [f"{n} ({domain(n)}n={len(rows[0].records[n])})" for n in names]
    cols.append(f"overall (n={rows[0].counts('overall')[1]})")
    out = ["| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for row in rows:
        out.append(f"| {row.label} | " + " | ".join(f"{100 * row.accuracy(n):.2f}" for n in [*names, "overall"]) + " |")
    for j in range(1, len(rows)):
        for i in range(j):
            a, b = rows[i], rows[j]
            cells = [f"{100 * (b.accuracy(n) - a.accuracy(n)):+.2f}" for n in [*names, "overall"]]
            out.append(f"| {b.label} - {a.label} | " + " | ".join(cells) + " |")
    return out


def plot_bars(rows: list[EvalRow], train_sets: list[str], out: Path) -> None:
    names = [*column_names(rows[0]), "overall"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for k, row in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(names))]
        values = [100 * row.accuracy(n) for n in names]
        bars = ax.bar(xs, values, width, label=row.label)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=1)
    ticks = [n if not train_sets or n == "overall" else f"{n}\n({'in' if n in train_sets else 'out of'} domain)"
             for n in names]
    ax.set_xticks(range(len(names)), ticks)
    ax.set_ylabel("held-out accuracy (%)"), ax.set_ylim(0, 122), ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(rows), loc="upper center")
    fig.tight_layout(), fig.savefig(out, dpi=110), plt.close(fig)


def write_comparison(runs: list[Path], base: Optional[Path], out_dir: Path) -> Path:
    """comparison.md, comparison.html and comparison.png in out_dir; returns the Markdown's path."""
    rows = collect_rows(runs, base)
    check_comparable(rows, runs)
    train_sets = next((t for r in runs if (t := train_modalities(r))), [])
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_bars(rows, train_sets, out_dir / "comparison.png")
    md = ["# Base model, SFT and GRPO on the same held-out records", "",
          "Accuracy (%) per modality, greedy decoding, counted from each evaluation's predictions.jsonl; "
          "the last rows give the change in points.", "", *comparison_table(rows, train_sets), "",
          f"Trained on: {', '.join(train_sets) or 'unknown'}.", "", "![comparison](comparison.png)", ""]
    md += [f"- {row.label}: {row.detail} ({row.folder})" for row in rows]
    text = "\n".join(md) + "\n"
    (out_dir / "comparison.md").write_text(text)
    (out_dir / "comparison.html").write_text(markdown_to_html(text, "base, SFT and GRPO"))
    return out_dir / "comparison.md"
