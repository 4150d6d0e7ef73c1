"""Evaluation scoring and the run report, checked against hand counts; `medvlm-r1 eval` on the tiny model."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from launcher.evaluate import eval_metrics, score_record, summarize_rows
from launcher.report import write_report
from medvqa.record import MedVQARecord

OPTS = {"A": "left", "B": "right"}


def _rec(i, modality, answer):
    return MedVQARecord(id=f"r{i}", image=Image.new("RGB", (28, 28)), question="Where is the lesion?",
                        options=OPTS, answer=answer, modality=modality)


# (modality, answer, completion, correct?, well formed?) — counted by hand below.
CASES = [
    ("MRI", "A", "<think>left side</think><answer>A</answer>", True, True),
    ("MRI", "B", "<think>x</think><answer>B)</answer>", True, True),
    ("MRI", "B", "<think>x</think><answer>A</answer>", False, True),
    ("CT", "A", "<answer>A</answer>", True, False),              # right letter, no think block
    ("CT", "B", "<think>x</think><answer>A or B</answer>", False, True),  # two letters: wrong
    ("X-ray", "A", "<think>unclosed <answer>A</answer>", False, False),
]


def test_scores_and_summaries_match_a_hand_count():
    rows = [score_record(_rec(i, m, a), text, 7, "stop") for i, (m, a, text, _, _) in enumerate(CASES)]
    assert [r["correct"] for r in rows] == [c[3] for c in CASES]
    assert [r["format_ok"] for r in rows] == [c[4] for c in CASES]
    by_set = {m: summarize_rows([r for r in rows if r["set"] == m]) for m in ("MRI", "CT", "X-ray")}
    assert by_set["MRI"]["accuracy"] == pytest.approx(2 / 3)  # rows 0, 1 right; row 2 wrong
    assert by_set["CT"]["accuracy"] == pytest.approx(1 / 2)
    assert by_set["X-ray"]["accuracy"] == 0.0
    overall = summarize_rows(rows)
    assert overall["accuracy"] == pytest.approx(3 / 6) and overall["format_rate"] == pytest.approx(4 / 6)  # rows 0, 1, 2, 4
    assert eval_metrics({"MRI": by_set["MRI"]})["eval/MRI/accuracy"] == pytest.approx(2 / 3)


def _fake_run(run_dir):
    """A run directory in the layout the training loop writes, with numbers chosen by hand."""
    (run_dir / "eval" / "step000000").mkdir(parents=True)
    (run_dir / "eval" / "step000040").mkdir(parents=True)
    base = {"MRI": {"n": 4, "accuracy": 0.25}, "CT": {"n": 4, "accuracy": 0.5}, "X-ray": {"n": 4, "accuracy": 0.5},
            "overall": {"n": 12, "accuracy": 0.4167}}
    final = {"MRI": {"n": 4, "accuracy": 1.0}, "CT": {"n": 4, "accuracy": 0.75}, "X-ray": {"n": 4, "accuracy": 0.25},
             "overall": {"n": 12, "accuracy": 0.6667}}
    for step, res in ((0, base), (40, final)):
        (run_dir / "eval" / f"step{step:06d}" / "summary.json").write_text(json.dumps({"step": step, "results": res}))
    (run_dir / "config.yaml").write_text("data:\n  train_modalities: [MRI]\n")
    rows = [{"step": s, "reward/total": 0.5 + s / 100, "reward/format": 1.0, "reward/accuracy": s / 100}
            for s in range(1, 41)]
    rows.insert(0, {"step": 0, "eval/MRI/accuracy": 0.25})
    rows.append({"step": 40, "eval/MRI/accuracy": 1.0})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run_dir / "samples").mkdir()
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(run_dir / "samples" / "step000040_0.png")
    (run_dir / "samples.jsonl").write_text(json.dumps({
        "step": 40, "image_file": "samples/step000040_0.png", "record_id": "r7", "modality": "MRI", "answer": "B",
        "reward/total": 2.0, "prompt": "Where is the lesion?", "completion": "<think>x</think><answer>B</answer>"}) + "\n")


def test_report_shows_the_paper_table_side_by_side(tmp_path):
    _fake_run(tmp_path)
    md = write_report(tmp_path).read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| checkpoint | MRI (in domain) | CT (out of domain) | X-ray (out of domain) | overall |"
    assert table[2] == "| start of GRPO (step 0) | 25.00 | 50.00 | 50.00 | 41.67 |"
    assert table[3] == "| GRPO (step 40) | 100.00 | 75.00 | 25.00 | 66.67 |"
    assert table[4] == "| change | +75.00 | +25.00 | -25.00 | +25.00 |"
    assert (tmp_path / "rewards.png").stat().st_size > 1000 and (tmp_path / "accuracy.png").stat().st_size > 1000
    assert "samples/step000040_0.png" in md and "<answer>B</answer>" in md
    page = (tmp_path / "report.html").read_text()
    assert "<td>100.00</td>" in page and "<img src='rewards.png'" in page


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_command_on_the_tiny_model(tiny_model_dir, tmp_path):
    from medvqa.synthetic import make_synthetic_split
    from medvqa_files import write_jsonl

    records = make_synthetic_split("MRI", "test", 6, seed=3, question_types=["location"], num_options=2,
                                   image_size=56) + \
        make_synthetic_split("CT", "test", 4, seed=3, question_types=["location"], num_options=2, image_size=56)
    data = write_jsonl(records, str(tmp_path / "fixture.jsonl"), str(tmp_path / "images"))
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "launcher", "eval", tiny_model_dir, "--out", str(out), "data.source=jsonl",
           f"data.eval_path={data}", "data.eval_modalities=[MRI,CT]", "rollout.max_new_tokens=16",
           "logging.wandb=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())["results"]
    preds = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert {m: summary[m]["n"] for m in ("MRI", "CT")} == {"MRI": 6, "CT": 4}
    assert sorted(p["id"] for p in preds) == sorted(r.id for r in records)
    truth = {r.id: r.answer for r in records}
    for m in ("MRI", "CT"):
        # Recount with the paper's own evaluation pattern, independently of the reward code.
        hits = [re.fullmatch(r".*<answer>\s*([A-Z])\s*</answer>.*", p["completion"], re.S) for p in preds if p["set"] == m]
        strict = sum(1 for h, p in zip(hits, [p for p in preds if p["set"] == m]) if h and h.group(1) == truth[p["id"]])
        assert summary[m]["accuracy"] >= strict / summary[m]["n"] - 1e-9
        assert summary[m]["accuracy"] == pytest.approx(sum(p["correct"] for p in preds if p["set"] == m) / summary[m]["n"])
        assert summary[m]["mean_length"] == pytest.approx(
            sum(p["num_tokens"] for p in preds if p["set"] == m) / summary[m]["n"])
