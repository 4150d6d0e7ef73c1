"""Public data as users download it: the published file names, modality keys and quirks; whole-file
evaluation with every skipped record accounted for; the paper's training subset in `datasets`' order."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.data import build_datasets, build_eval_sets
from medvqa.loaders import load_records
from medvqa.record_checks import ANSWER_NOT_IN_OPTIONS, MISSING_IMAGE, LoadError
from medvqa_files import (
    CT, HUATUO_FILE, MR, OCT, PAPER_TEST_FILE, XR, huatuo_row, omni_row, paper_test_row, png, write_json,
)

REPO = Path(__file__).resolve().parents[2]
PAPER_CONFIG = str(REPO / "configs" / "medvlm_r1_2b.yaml")


def paper_config(*overrides):
    return load_config(PAPER_CONFIG, list(overrides))


def write_paper_test_file(folder: Path) -> Path:
    """The authors' test file in miniature, beside images/: MRI 4 usable + 1 missing image, CT 3 usable +
    1 answer not among its options, X-ray 3, and one OCT record the paper's sets do not take."""
    plan = [(MR, 2), (MR, 4), (MR, 4), (MR, 2), (CT, 4), (CT, 4), (CT, 2), (XR, 4), (XR, 4), (XR, 2), (OCT, 4)]
    rows = []
    for i, (subset, k) in enumerate(plan):
        options = [f"finding {i}-{j}" for j in range(k)]
        rows.append(paper_test_row(f"images/img{i:03d}.png", f"What is shown in image {i}?", options,
                                   options[i % k], subset))
        png(folder / "images" / f"img{i:03d}.png", i, size=56)  # big enough for the Qwen2-VL processor
    rows.insert(2, paper_test_row("images/gone.png", "q", ["a", "b"], "a", MR))
    rows.insert(7, paper_test_row("images/img004.png", "q", ["a", "b", "c", "d"], "e", CT))
    return write_json(folder / PAPER_TEST_FILE, rows)


@pytest.fixture
def paper_test_file(tmp_path):
    return write_paper_test_file(tmp_path / "Medical_Multimodal_Evaluation_Data")


# ---------------------------------------------------------------- 1. the published file name

def test_paper_config_and_readme_use_the_published_file_name():
    text = (REPO / "README.md").read_text() + Path(PAPER_CONFIG).read_text()
    assert HUATUO_FILE in text and "medical_multimodal_evaluation_data.json" not in text
    cfg = paper_config()
    assert Path(cfg.data.path).name == HUATUO_FILE and Path(cfg.data.eval_path).name == PAPER_TEST_FILE


def test_a_missing_path_names_the_similar_files_beside_it(tmp_path):
    write_json(tmp_path / HUATUO_FILE, [huatuo_row("images/a.png", "q", ["a"], "a", MR)])
    (tmp_path / "images.zip").write_bytes(b"")
    mistyped = tmp_path / "medical_multimodal_evaluation_data.json"
    with pytest.raises(LoadError, match=rf"{mistyped}: no such file or folder; similar names in .*: {HUATUO_FILE}$"):
        load_records("huatuo", str(mistyped))
    with pytest.raises(LoadError, match=rf"similar names in .*: {HUATUO_FILE}$"):
        load_records("jsonl", str(tmp_path / "medical_multimodel_evaluation_data.jsonl"))
    with pytest.raises(LoadError, match=r"no such OmniMedVQA folder; .* holds 2 entries"):
        load_records("omnimedvqa", str(tmp_path / "OmniMedVQA"))
    with pytest.raises(LoadError, match=r"its folder .*nowhere does not exist either"):
        load_records("hf", str(tmp_path / "nowhere" / "set"))


# ---------------------------------------------------------------- 2. modality keys; nothing disappears

@pytest.fixture
def omni_root(tmp_path):
    root = tmp_path / "OmniMedVQA"
    for i in range(5):
        png(root / "Images" / "Src" / f"{i}.png", i)
    chest_ct = [omni_row("ct-0", "Images/Src/0.png", "CT(Computed Tomography)", ["Lung", "Bone"], "Lung"),
                omni_row("ct-1", "Images/Src/1.png", "CT(Computed Tomography)", ["Lung", "Bone"], "Bone",
                         modality_key="modality")]
    retina = [omni_row("oct-0", "Images/Src/2.png", OCT, ["Retina", "Lens"], "Retina"),
              omni_row("oct-1", "Images/Src/3.png", OCT, ["Retina", "Lens"], "Lens")]
    brain = [omni_row("mr-0", "Images/Src/4.png", MR, ["Brain", "Knee"], "Brain")]
    for name, rows in (("Chest CT Scan", chest_ct), ("Retinal OCT-C8", retina), ("Brain Tumor MRI", brain)):
        write_json(root / "QA_information" / "Open-access" / f"{name}.json", rows)
    return root


def test_omnimedvqa_record_with_a_modality_key_is_evaluated_and_oct_is_reported(omni_root, caplog):
    cfg = paper_config("data.source=omnimedvqa", f"data.eval_path={omni_root}", "data.eval_modalities=[MRI,CT]")
    with caplog.at_level("INFO", logger="launcher.data"):
        data = build_eval_sets(cfg.data)
    assert {m: [r.id for r in rs] for m, rs in data.evals.items()} == {"MRI": ["mr-0"], "CT": ["ct-0", "ct-1"]}
    usage = data.usage()
    assert usage["CT"] == dict(spellings=[CT], read=2, skipped=0, train=0, eval=2, left_out=0)
    assert usage[OCT] == dict(spellings=[OCT], read=2, skipped=0, train=0, eval=0, left_out=2)
    assert f"modalities in no training or evaluation set: '{OCT}' (2)" in caplog.text
    assert data.summary()["files"]["eval_path"]["not_asked_for"] == {OCT: 2}


def test_training_left_overs_are_counted_per_modality(paper_test_file):
    # Held-out split of one file: MRI trains (a subset of 2), every modality is evaluated (1 each).
    cfg = paper_config(f"data.path={paper_test_file}", "data.eval_path=null", "data.num_train=2",
                       "data.num_eval_per_modality=1", "data.test_fraction=0.5")
    train, evals = build_datasets(cfg.data)
    assert len(train) == 2 and {m: len(rs) for m, rs in evals.items()} == {"MRI": 1, "CT": 1, "X-ray": 1}
    data = build_eval_sets(cfg.data)  # the same held-out sets; nothing trains in an evaluation run
    assert {m: [r.id for r in rs] for m, rs in data.evals.items()} == {m: [r.id for r in rs] for m, rs in evals.items()}
    usage = data.usage()
    assert [(m, u["read"], u["skipped"], u["eval"], u["left_out"]) for m, u in usage.items()] == [
        ("MRI", 5, 1, 1, 3), ("CT", 4, 1, 1, 2), ("X-ray", 3, 0, 1, 2), (OCT, 1, 0, 0, 1)]


# ---------------------------------------------------------------- 3. evaluating a whole file

def test_eval_path_scores_every_usable_record_in_file_order(paper_test_file):
    # data.path of the paper config (/data/...) is not read: only the file to evaluate is.
    cfg = paper_config(f"data.eval_path={paper_test_file}", "data.num_eval_per_modality=1")
    data = build_eval_sets(cfg.data)
    stem = PAPER_TEST_FILE[:-len(".json")]
    ids = {m: [int(r.id.rsplit("-", 1)[1]) for r in rs] for m, rs in data.evals.items()}
    # rows 2 (missing image) and 7 (answer not among options) are skipped, row 12 (OCT) is not asked for
    assert ids == {"MRI": [0, 1, 3, 4], "CT": [5, 6, 8], "X-ray": [9, 10, 11]}
    assert data.evals["MRI"][1].options == {"A": "finding 1-0", "B": "finding 1-1", "C": "finding 1-2",
                                            "D": "finding 1-3"} and data.evals["MRI"][1].answer == "B"
    summary = json.loads(json.dumps(data.summary()))  # what summary.json holds
    file = summary["files"]["eval_path"]
    assert file["skipped_by_reason"] == {MISSING_IMAGE: 1, ANSWER_NOT_IN_OPTIONS: 1}
    assert [(s["id"], s["reason"], s["modality"]) for s in file["skipped_records"]] == [
        (f"{stem}-2", MISSING_IMAGE, MR), (f"{stem}-7", ANSWER_NOT_IN_OPTIONS, CT)]
    assert all(s["file"] == str(paper_test_file) for s in file["skipped_records"])
    assert summary["usage_by_modality"]["MRI"] == dict(spellings=[MR], read=5, skipped=1, train=0, eval=4,
                                                       left_out=0)


def test_paper_config_trains_on_the_mri_of_path_and_evaluates_eval_path(paper_test_file, tmp_path):
    rows = [huatuo_row(f"images/t{i}.png", f"q{i}", ["x", "y"], "y", [MR, CT, "Fundus Photography"][i % 3])
            for i in range(9)]
    for i in range(9):
        png(tmp_path / "train" / "images" / f"t{i}.png", 100 + i)
    train_file = write_json(tmp_path / "train" / HUATUO_FILE, rows)
    cfg = paper_config(f"data.path={train_file}", f"data.eval_path={paper_test_file}")
    train, evals = build_datasets(cfg.data)
    assert sorted(r.id for r in train) == [f"{HUATUO_FILE[:-5]}-{i}" for i in (0, 3, 6)]
    assert sum(map(len, evals.values())) == 10


# ---------------------------------------------------------------- 5. the paper's subset, in datasets' order

def _huatuo_like_rows(tmp_path, n=40):
    """Huatuo-layout rows of four subsets, interleaved unevenly so the MRI rows are not evenly spaced."""
    subsets = [MR, CT, MR, XR, MR, "Microscopy Images", MR]
    rows = [huatuo_row(f"images/s{i}.png", f"question {i}", ["yes", "no"], ["yes", "no"][i % 2],
                       subsets[i % len(subsets)]) for i in range(n)]
    for i in range(n):
        png(tmp_path / "images" / f"s{i}.png", i)
    return rows


@pytest.mark.parametrize("num_train", [None, 23, 7])
def test_num_train_takes_the_rows_of_datasets_shuffle_seed_42(tmp_path, paper_test_file, num_train):
    datasets = pytest.importorskip("datasets")
    rows = _huatuo_like_rows(tmp_path)
    path = write_json(tmp_path / HUATUO_FILE, rows)
    ds = datasets.Dataset.from_list(rows).add_column("row", list(range(len(rows))))
    mr = ds.filter(lambda x: x["subset"] == MR)  # the authors' loader, word for word in effect
    # num_train=null takes every MRI row in file order (the prompt sampler shuffles them each epoch)
    expected = mr.shuffle(seed=42)["row"][:num_train] if num_train else mr["row"]
    cfg = paper_config(f"data.path={path}", f"data.eval_path={paper_test_file}",
                       f"data.num_train={'null' if num_train is None else num_train}")
    train, _ = build_datasets(cfg.data)
    assert [int(r.id.rsplit("-", 1)[1]) for r in train] == expected
    assert len(expected) == min(len(mr), num_train or len(mr)) == (num_train or 23)


def test_hf_source_draws_the_same_rows_as_datasets_shuffle(tmp_path, paper_test_file):
    datasets = pytest.importorskip("datasets")
    rows = _huatuo_like_rows(tmp_path)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "hfset"))
    for i in range(len(rows)):
        png(tmp_path / "hfset" / "images" / f"s{i}.png", i)
    expected = ds.add_column("row", list(range(len(ds)))).filter(lambda x: x["subset"] == MR).shuffle(seed=7)["row"][:9]
    cfg = paper_config("data.source=hf", f"data.path={tmp_path / 'hfset'}", f"data.eval_path={tmp_path / 'hfset'}",
                       "data.eval_modalities=[CT]", "data.num_train=9", "data.seed=7")
    train, evals = build_datasets(cfg.data)
    assert [int(r.id.rsplit("-", 1)[1]) for r in train] == expected
    assert len(evals["CT"]) == sum(r["subset"] == CT for r in rows)


# ---------------------------------------------------------------- the eval command on the paper config

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_command_with_the_paper_config_scores_the_whole_file(tiny_model_dir, paper_test_file, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "launcher", "eval", tiny_model_dir, "--config", PAPER_CONFIG, "--out", str(out),
           f"data.eval_path={paper_test_file}", "cluster.device=cpu", "learner.precision=fp32",
           "rollout.num_workers=1", "rollout.max_new_tokens=16", "rollout.enforce_eager=true",  # no compile on CPU
           "cluster.cpus_per_actor=1", "logging.wandb=false",
           f"model.path={tiny_model_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=850, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {m: summary["results"][m]["n"] for m in ("MRI", "CT", "X-ray", "overall")} == \
        {"MRI": 4, "CT": 3, "X-ray": 3, "overall": 10}
    assert summary["data"]["files"]["eval_path"]["skipped_by_reason"] == {MISSING_IMAGE: 1, ANSWER_NOT_IN_OPTIONS: 1}
    assert re.search(r"MRI +'MR \(Mag-netic Resonance Imaging\)' +5 +1 +0 +4 +0", proc.stderr)
    assert re.search(r"MRI +n= +4 accuracy=", proc.stdout)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 10


def _readme_paper_commands() -> list:
    """Every command of the README that runs the paper config, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.split("#")[0] for b in blocks for line in b.splitlines() if "configs/medvlm_r1_2b.yaml" in line]


def test_readme_commands_for_the_paper_data_load_and_name_the_published_files():
    commands = _readme_paper_commands()
    assert len(commands) >= 4
    cfg = paper_config()
    for command in commands:
        overrides = [t for t in command.split() if re.fullmatch(r"[a-z_]+\.[a-z_.]+=\S+", t)]
        loaded = load_config(PAPER_CONFIG, overrides)  # every key exists and every value passes validation
        assert loaded.data.path == cfg.data.path and loaded.data.eval_path == cfg.data.eval_path, command
    assert any("data.eval_path=" in c and " eval " in c for c in commands)
    # the download lines put the files where the config looks for them
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    assert f"--local-dir {Path(cfg.data.path).parent}\n" in text and f"-o {cfg.data.eval_path} " in text
