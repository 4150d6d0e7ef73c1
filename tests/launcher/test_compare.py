"""The base / SFT / GRPO table, counted from fixture evaluation folders by hand; mismatched runs are refused."""
import json

import numpy as np
import pytest
from PIL import Image

from launcher.cli import main
from launcher.compare import ComparisonError, write_comparison

SETS = {"MRI": 4, "CT": 4, "X-ray": 2}
# Which records each evaluation answers correctly, chosen by hand (index within its set).
BASE = {"MRI": {0, 1}, "CT": {2}, "X-ray": {0}}  # 2/4, 1/4, 1/2; overall 4/10
SFT = {"MRI": {0, 1, 2, 3}, "CT": {0, 1}, "X-ray": set()}  # 4/4, 2/4, 0/2; overall 6/10
GRPO = {"MRI": {0, 1, 2, 3}, "CT": {0, 1, 3}, "X-ray": {0, 1}}  # 4/4, 3/4, 2/2; overall 9/10
DATA = "data:\n  source: synthetic\n  train_modalities: [MRI]\n  seed: {seed}\nrollout:\n  max_new_tokens: 48\n"


def _answer(name, i):
    return "AB"[i % 2]


def _write_eval(folder, right, ids=None, answers=None):
    folder.mkdir(parents=True)
    rows = []
    for name, n in SETS.items():
        for i in range(n):
            rid = (ids or {}).get((name, i), f"{name}-{i}")
            answer = (answers or {}).get(rid, _answer(name, i))
            if name in right:
                rows.append({"id": rid, "set": name, "answer": answer, "prompt": f"question {rid}",
                             "correct": i in right[name], "completion": "<answer>A</answer>"})
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(root, name, method, evals, seed=42):
    run = root / name
    for step, right in evals.items():
        _write_eval(run / "eval" / f"step{step:06d}", right)
    (run / "config.yaml").write_text(DATA.format(seed=seed))
    (run / "summary.json").write_text(json.dumps({"method": method, "steps": 200}))
    return run


@pytest.fixture
def runs(tmp_path):
    grpo = _run(tmp_path, "grpo-run", "grpo", {0: BASE, 100: SFT, 200: GRPO})
    sft = _run(tmp_path, "sft-run", "sft", {0: BASE, 200: SFT})
    return grpo, sft


def test_table_matches_hand_counts(runs, tmp_path, capsys):
    grpo, sft = runs
    # The SFT run first on the command line: rows still come in the paper's order, base from GRPO's step 0.
    assert main(["report", str(sft), "--compare", str(grpo), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table == [
        "| model | MRI (in domain, n=4) | CT (out of domain, n=4) | X-ray (out of domain, n=2) | overall (n=10) |",
        "|---|---|---|---|---|",
        "| base | 50.00 | 25.00 | 50.00 | 40.00 |",
        "| SFT | 100.00 | 50.00 | 0.00 | 60.00 |",
        "| GRPO | 100.00 | 75.00 | 100.00 | 90.00 |",
        "| SFT - base | +50.00 | +25.00 | -50.00 | +20.00 |",
        "| GRPO - base | +50.00 | +50.00 | +50.00 | +50.00 |",
        "| GRPO - SFT | +0.00 | +25.00 | +100.00 | +30.00 |",
    ]
    assert f"- base: step 0 of grpo-run ({grpo / 'eval' / 'step000000'})" in md
    assert f"- GRPO: step 200 of grpo-run ({grpo / 'eval' / 'step000200'})" in md
    page = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "<td>90.00</td>" in page and "<td>+100.00</td>" in page and "<img src='comparison.png'" in page
    with Image.open(tmp_path / "cmp" / "comparison.png") as png:
        assert png.size[0] > 500 and len(np.unique(np.asarray(png.convert("L")))) > 10  # drawn, not blank
    assert "comparison written to" in capsys.readouterr().out


def test_a_given_base_evaluation_replaces_step_zero(runs, tmp_path):
    grpo, sft = runs
    for folder in (grpo / "eval" / "step000000", sft / "eval" / "step000000"):
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    with pytest.raises(ComparisonError, match="no step-0 evaluation.*--base"):
        write_comparison([grpo, sft], None, tmp_path / "cmp")
    _write_eval(tmp_path / "base-eval", {"MRI": {3}, "CT": set(), "X-ray": {0, 1}})
    md = write_comparison([grpo, sft], tmp_path / "base-eval", tmp_path / "cmp").read_text()
    assert "| base | 25.00 | 0.00 | 100.00 | 30.00 |" in md and "- base: given evaluation" in md
    assert "| GRPO - base | +75.00 | +75.00 | +0.00 | +60.00 |" in md


def test_other_records_are_refused_naming_the_difference(runs, tmp_path):
    grpo, sft = runs
    swapped = tmp_path / "swapped"
    _write_eval(swapped / "eval" / "step000200", SFT, ids={("CT", 3): "CT-9"})
    (swapped / "summary.json").write_text(json.dumps({"method": "sft"}))
    with pytest.raises(ComparisonError, match=r"set CT: 1 records only in .*step000000 \(CT-3\), 1 only in "
                                              r".*swapped.*step000200 \(CT-9\)"):
        write_comparison([grpo, swapped], None, tmp_path / "cmp")
    assert main(["report", str(grpo), "--compare", str(swapped)]) == 2
    assert not (grpo / "comparison.md").exists()


def test_other_answers_sets_or_data_are_refused(runs, tmp_path):
    grpo, _ = runs
    relabelled = tmp_path / "relabelled"
    _write_eval(relabelled / "eval" / "step000200", SFT, answers={"X-ray-1": "A"})
    with pytest.raises(ComparisonError, match=r"set X-ray, record X-ray-1: answer B in .* but A in "):
        write_comparison([grpo, relabelled], None, tmp_path / "cmp")
    fewer = tmp_path / "fewer"
    _write_eval(fewer / "eval" / "step000200", {"MRI": SFT["MRI"], "CT": SFT["CT"]})
    with pytest.raises(ComparisonError, match=r"evaluation sets \['CT', 'MRI', 'X-ray'\] in .* but \['CT', 'MRI'\]"):
        write_comparison([grpo, fewer], None, tmp_path / "cmp")
    reseeded = _run(tmp_path, "reseeded", "sft", {200: SFT}, seed=7)
    with pytest.raises(ComparisonError, match=r"different data: data.seed: 42 in .*grpo-run but 7 in .*reseeded"):
        write_comparison([grpo, reseeded], None, tmp_path / "cmp")


def test_a_malformed_prediction_row_names_file_and_line(runs, tmp_path):
    grpo, sft = runs
    path = sft / "eval" / "step000200" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"id": "MRI-2", "set": "MRI"})
    path.write_text("\n".join(lines) + "\n")
    lacks = r"predictions.jsonl:3: prediction row lacks \['answer', 'prompt', 'correct'\]"
    with pytest.raises(ComparisonError, match=lacks):
        write_comparison([grpo, sft], None, tmp_path / "cmp")
    lines[2] = '{"id": "MRI-2", "set": '
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ComparisonError, match=r"predictions.jsonl:3: not a JSON object"):
        write_comparison([grpo, sft], None, tmp_path / "cmp")
