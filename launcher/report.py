"""`medvlm-r1 report RUN_DIR`: the paper's per-modality table, reward and accuracy curves, sample completions."""
from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

PAPER_ORDER = ("MRI", "CT", "X-ray")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_evaluations(run_dir: Path) -> dict[int, dict]:
    """{step: {set: summary}} from the evaluation folders the training loop writes."""
    out = {}
    for summary in sorted((run_dir / "eval").glob("step*/summary.json")):
        data = json.loads(summary.read_text())
        out[int(data["step"])] = data["results"]
    return out


def accuracy_table(evals: dict[int, dict], train_sets: list[str], method: str = "GRPO") -> list[str]:
    """Markdown rows: one per checkpoint (start, end), columns in the paper's order, then the overall mean."""
    if not evals:
        return ["(no evaluation was run)"]
    names = [n for n in PAPER_ORDER if n in evals[min(evals)]] + \
        [n for n in evals[min(evals)] if n not in PAPER_ORDER and n != "overall"]
    mark = lambda n: f"{n} (in domain)" if n in train_sets else f"{n} (out of domain)"  # noqa: E731
    header = "| checkpoint | " + " | ".join(mark(n) for n in names) + " | overall |"
    rows = [header, "|" + "---|" * (len(names) + 2)]
    first, last = min(evals), max(evals)
    for label, step in ((f"start of {method} (step {first})", first), (f"{method} (step {last})", last)):
        res = evals[step]
        cells = [f"{100 * res[n]['accuracy']:.2f}" for n in names]
        overall = res.get("overall", res[names[0]])["accuracy"]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {100 * overall:.2f} |")
    deltas = [f"{100 * (evals[last][n]['accuracy'] - evals[first][n]['accuracy']):+.2f}" for n in names]
    d_all = evals[last].get("overall", evals[last][names[0]])["accuracy"] - \
        evals[first].get("overall", evals[first][names[0]])["accuracy"]
    rows.append("| change | " + " | ".join(deltas) + f" | {100 * d_all:+.2f} |")
    return rows


def plot_curves(metrics: list[dict], out: Path) -> list[str]:
    steps = [m for m in metrics if "reward/total" in m]
    evals = [m for m in metrics if any(k.startswith("eval/") for k in m)]
    files = []
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in ("reward/total", "reward/format", "reward/accuracy"):
            ax.plot([m["step"] for m in steps], [m.get(key) for m in steps], label=key)
        ax.set_xlabel("step"), ax.set_ylabel("mean reward"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out / "rewards.png", dpi=110), plt.close(fig)
        files.append("rewards.png")
    acc_keys = sorted({k for m in evals for k in m if k.startswith("eval/") and k.endswith("/accuracy")})
    if evals and acc_keys:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in acc_keys:
            pts = [(m["step"], m[key]) for m in evals if key in m]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key.split("/")[1])
        ax.set_xlabel("step"), ax.set_ylabel("held-out accuracy"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(out / "accuracy.png", dpi=110), plt.close(fig)
        files.append("accuracy.png")
    return files


def _sample_section(samples: list[dict], count: int = 4) -> list[str]:
    if not samples:
        return ["(no samples were logged)"]
    last_step = max(s["step"] for s in samples)
    lines = []
    for s in [s for s in samples if s["step"] == last_step][:count]:
        lines += [f"**{s['record_id']}** ({s['modality']}, answer {s['answer']}, step {s['step']}, "
                  f"reward {s['reward/total']:.2f})", "", f"![scan]({s['image_file']})", "",
                  "```", s["prompt"], "---", s["completion"], "```", ""]
    return lines


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a training run directory")
    metrics = _read_jsonl(metrics_path)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    train_sets = train_modalities(run_dir)
    md = [f"# MedVLM-R1 run report: {run_dir.name}", "",
          "## Held-out accuracy (%) per modality, greedy decoding", "",
          *accuracy_table(load_evaluations(run_dir), train_sets, summary.get("method", "grpo").upper()), "",
          f"Trained on: {', '.join(train_sets) or 'unknown'}.", "", "## Curves", ""]
    md += [f"![{f}]({f})" for f in plot_curves(metrics, run_dir)] + [""]
    md += ["## Training rewards", ""] + [f"- {k}: {v:.3f}" for k, v in summary.items() if isinstance(v, float)]
    md += ["", "## Sample completions", "", *_sample_section(_read_jsonl(run_dir / "samples.jsonl"))]
    text = "\n".join(md) + "\n"
    (run_dir / "report.md").write_text(text)
    (run_dir / "report.html").write_text(markdown_to_html(text, run_dir.name))
    return run_dir / "report.md"


def train_modalities(run_dir: Path) -> list[str]:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return []
    from omegaconf import OmegaConf

    return list(OmegaConf.load(cfg_path).data.train_modalities)


def markdown_to_html(markdown: str, title: str) -> str:
    """A small Markdown subset (headings, tables, images, code, lists) is all the report uses."""
    body, in_code, in_table = [], False, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            body.append(html.escape(line))
        elif line.startswith("|"):
            if not in_table:
                body.append("<table border='1' cellpadding='4'>")
                in_table = True
            if not set(line) <= set("|-"):
                body.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>")
            continue
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1:line.rindex(")")]
            body.append(f"<img src='{html.escape(src)}' style='max-width:480px;image-rendering:pixelated'>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
        if in_table and not line.startswith("|"):
            body.insert(len(body) - 1, "</table>")
            in_table = False
    if in_table:
        body.append("</table>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>" \
           f"<body>{''.join(body)}</body></html>\n"
