"""Loaders of public med-VQA formats: fixtures in each format are written here, with tiny numpy-drawn PNGs."""
import json
import logging

import numpy as np
import pytest

from medvqa.hf_loader import load_hf_dataset
from medvqa.loaders import load_huatuo_eval, load_jsonl, load_omnimedvqa, load_records
from medvqa.record import MedVQARecord
from medvqa.record_checks import (
    AMBIGUOUS_ANSWER, ANSWER_NOT_IN_OPTIONS, MISSING_IMAGE, MULTIPLE_IMAGES, NO_OPTIONS, UNREADABLE_IMAGE,
    LoadError, normalize_modality,
)
from medvqa.splits import image_identity, seeded_subset, split_by_image
from medvqa_files import CT, HUATUO_FILE, MR, XR, omni_row as _omni_record, png as _png, png_bytes as _png_bytes
from medvqa_files import scan as _scan, write_jsonl as save_jsonl


def _skips(report):
    return [(s.id, s.reason) for s in report.skipped]


# ---------------------------------------------------------------- OmniMedVQA

@pytest.fixture
def omni_root(tmp_path):
    root = tmp_path / "OmniMedVQA"
    for i, name in enumerate(["mri1", "mri2", "ct1", "xr1", "fundus1"]):
        _png(root / "Images" / "Src" / f"{name}.png", i)
    (root / "Images" / "Src" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    open_access = [
        _omni_record("mri-0", "Images/Src/mri1.png", MR, ["Liver", "Brain", "Knee", "Heart"], "Brain"),
        _omni_record("mri-1", "Images/Src/mri2.png", MR, ["Yes", "No"], "No"),
        _omni_record("ct-0", "Images/Src/ct1.png", CT, ["Lung", "Bone", "Gut"], "Gut"),
        _omni_record("mri-missing", "Images/Src/nope.png", MR, ["a", "b"], "a"),
        _omni_record("ct-missing", "Images/Src/nope.png", CT, ["a", "b"], "a"),
    ]
    restricted = [
        _omni_record("xr-0", "Images/Src/xr1.png", XR, ["Chest", "Hand"], "Chest"),
        _omni_record("fundus-0", "Images/Src/fundus1.png", "Fundus Photography", ["Eye", "Ear"], "Eye"),
        _omni_record("mri-corrupt", "Images/Src/corrupt.png", MR, ["a", "b"], "b"),
        _omni_record("mri-wrong", "Images/Src/mri1.png", MR, ["a", "b"], "c"),
        _omni_record("mri-noopt", "Images/Src/mri1.png", MR, [], "a"),
    ]
    for access, recs in (("Open-access", open_access), ("Restricted-access", restricted)):
        (root / "QA_information" / access).mkdir(parents=True)
        (root / "QA_information" / access / f"{access}.json").write_text(json.dumps(recs))
    return root


def test_omnimedvqa_loads_maps_modalities_and_skips_bad_records(omni_root, caplog):
    with caplog.at_level(logging.WARNING, logger="medvqa.loaders"):
        records, report = load_omnimedvqa(str(omni_root))
    assert [r.id for r in records] == ["mri-0", "mri-1", "ct-0", "xr-0", "fundus-0"]
    assert [r.answer for r in records] == ["B", "B", "C", "A", "A"]
    assert [r.modality for r in records] == ["MRI", "MRI", "CT", "X-ray", "Fundus Photography"]
    assert records[2].options == {"A": "Lung", "B": "Bone", "C": "Gut"}  # absent option_D is no option
    assert records[0].image == str(omni_root / "Images/Src/mri1.png")
    assert records[0].load_image().size == (8, 8)
    assert _skips(report) == [
        ("mri-missing", MISSING_IMAGE), ("ct-missing", MISSING_IMAGE), ("mri-corrupt", UNREADABLE_IMAGE),
        ("mri-wrong", ANSWER_NOT_IN_OPTIONS), ("mri-noopt", NO_OPTIONS)]
    assert report.counts() == {MISSING_IMAGE: 2, UNREADABLE_IMAGE: 1, ANSWER_NOT_IN_OPTIONS: 1, NO_OPTIONS: 1}
    assert report.skipped[0].file.endswith("Open-access.json")
    assert report.skipped[2].file.endswith("Restricted-access.json")
    assert report.loaded == 5 and report.filtered_out == 0
    assert "mri-corrupt" in caplog.text and "Restricted-access.json" in caplog.text


def test_omnimedvqa_modality_filter_counts(omni_root):
    records, report = load_omnimedvqa(str(omni_root), modalities=["MRI"])
    assert [r.id for r in records] == ["mri-0", "mri-1"]
    # ct-missing is another modality: filtered out, not checked, not reported as skipped
    assert report.filtered_out == 4  # ct-0, ct-missing, xr-0, fundus-0
    assert [s.id for s in report.skipped] == ["mri-missing", "mri-corrupt", "mri-wrong", "mri-noopt"]
    same, _ = load_omnimedvqa(str(omni_root), modalities=[MR])  # the source's own spelling works too
    assert [r.id for r in same] == ["mri-0", "mri-1"]
    both, report = load_omnimedvqa(str(omni_root), modalities=["CT", "X-ray"])
    assert [r.id for r in both] == ["ct-0", "xr-0"] and report.filtered_out == 7
    assert _skips(report) == [("ct-missing", MISSING_IMAGE)]


def test_omnimedvqa_errors_name_root_and_key(omni_root, tmp_path):
    with pytest.raises(LoadError, match=str(tmp_path / "nowhere")):
        load_omnimedvqa(str(tmp_path / "nowhere"))
    with pytest.raises(LoadError, match=r"asked for modalities \['Ultrasound'\]"):
        load_omnimedvqa(str(omni_root), modalities=["Ultrasound"])
    bad = omni_root / "QA_information" / "Open-access" / "Open-access.json"
    recs = json.loads(bad.read_text())
    del recs[1]["gt_answer"]
    bad.write_text(json.dumps(recs))
    with pytest.raises(LoadError, match=r"Open-access\.json: record 1 \(mri-1\): missing key 'gt_answer'"):
        load_omnimedvqa(str(omni_root))


def test_normalize_modality_spellings():
    assert [normalize_modality(m) for m in (MR, "MRI", "mr", CT, "CT", XR, "x-ray", "Chest X-ray")] == \
        ["MRI", "MRI", "MRI", "CT", "CT", "X-ray", "X-ray", "X-ray"]
    assert normalize_modality("OCT (Optical Coherence Tomography") == "OCT (Optical Coherence Tomography"
    assert normalize_modality(" Ultrasound ") == "Ultrasound"


# ---------------------------------------------------------------- HuatuoGPT-Vision evaluation format

@pytest.fixture
def huatuo_file(tmp_path):
    folder = tmp_path / "huatuo"
    for i in range(4):
        _png(folder / "images" / f"img{i}.png", 10 + i)
    recs = [
        {"image": ["images/img0.png"], "question": "Which organ?", "options": ["Liver", "Brain", "Knee"],
         "answer": "Knee", "dataset": "OmniMedVQA", "subset": MR},
        {"image": ["images/img1.png"], "question": "Is it normal?", "options": ["Yes", "No"],
         "answer": "B", "dataset": "OmniMedVQA", "subset": CT},
        {"image": ["images/img2.png"], "question": "Which letter?", "options": ["B", "C"],
         "answer": "B", "dataset": "OmniMedVQA", "subset": XR},
        {"image": ["images/img3.png"], "question": "Spacing?", "options": ["Left lung", "Right lung"],
         "answer": " right LUNG ", "dataset": "OmniMedVQA", "subset": MR},
        {"image": ["images/img0.png"], "question": "q", "options": [], "answer": "x", "subset": MR},
        {"image": ["images/img0.png"], "question": "q", "options": ["a", "b"], "answer": "E", "subset": MR},
        {"image": ["images/gone.png"], "question": "q", "options": ["a", "b"], "answer": "a", "subset": CT},
        {"image": ["images/img0.png", "images/img1.png"], "question": "q", "options": ["a", "b"],
         "answer": "a", "subset": CT},
    ]
    path = folder / HUATUO_FILE
    path.write_text(json.dumps(recs))
    return path


def test_huatuo_letters_answers_ids_and_skips(huatuo_file):
    records, report = load_huatuo_eval(str(huatuo_file))
    stem = HUATUO_FILE[:-len(".json")]
    assert [r.id for r in records] == [f"{stem}-{i}" for i in range(4)]
    assert records[0].options == {"A": "Liver", "B": "Brain", "C": "Knee"}
    # text -> its letter; a bare letter -> that letter; option text wins over a letter; case and spaces ignored
    assert [r.answer for r in records] == ["C", "B", "A", "B"]
    assert [r.modality for r in records] == ["MRI", "CT", "X-ray", "MRI"]
    assert records[0].source == "OmniMedVQA"
    assert records[1].image == str(huatuo_file.parent / "images" / "img1.png")
    assert _skips(report) == [(f"{stem}-4", NO_OPTIONS), (f"{stem}-5", ANSWER_NOT_IN_OPTIONS),
                              (f"{stem}-6", MISSING_IMAGE), (f"{stem}-7", MULTIPLE_IMAGES)]
    assert all(s.file == str(huatuo_file) for s in report.skipped)
    folder_records, _ = load_huatuo_eval(str(huatuo_file.parent))  # a folder reads its *.json files
    assert [r.id for r in folder_records] == [r.id for r in records]


def test_huatuo_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('[\n{"image": ["a.png"],\n "question": "q",, }\n]')
    with pytest.raises(LoadError, match=r"eval\.json: malformed JSON at line 3"):
        load_huatuo_eval(str(path))
    path.write_text('{"image": "a.png"}')
    with pytest.raises(LoadError, match=r"eval\.json: expected a JSON list"):
        load_huatuo_eval(str(path))


def test_empty_data_set_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "allbad.json"
    path.write_text(json.dumps([{"image": ["none.png"], "question": "q", "options": ["a"], "answer": "a"}]))
    with pytest.raises(LoadError, match=r"allbad\.json: no usable records \(1 skipped \{'missing_image': 1\}"):
        load_huatuo_eval(str(path))


def test_answer_text_wins_over_letter_and_ambiguity_is_skipped(tmp_path):
    _png(tmp_path / "images" / "a.png", 1)
    rows = [{"id": i, "image": ["images/a.png"], "question": "q", "options": opts, "answer": ans}
            for i, (opts, ans) in enumerate([(["B", "C"], "B"), (["Yes", "No"], "b"), (["Yes", "yes"], "YES"),
                                             (["Yes", "yes"], "yes")])]
    (tmp_path / "set.json").write_text(json.dumps(rows))
    records, report = load_huatuo_eval(str(tmp_path / "set.json"))
    # "B" is the text of option A; a bare "b" is letter B; "YES" equals two texts; "yes" exactly one
    assert [(r.id, r.answer) for r in records] == [("0", "A"), ("1", "B"), ("3", "B")]
    assert _skips(report) == [("2", AMBIGUOUS_ANSWER)]


# ---------------------------------------------------------------- our JSONL

def _records(n, shared=()):
    """n records; those whose index is in `shared` reuse record 0's image."""
    return [MedVQARecord(id=f"r{i}", image=_scan(0 if i in shared else i), question=f"q{i}?",
                         options={"A": "x", "B": "y", "C": f"z{i}"}, answer="ABC"[i % 3],
                         modality=("MRI", "CT", "X-ray")[i % 3], source="test") for i in range(n)]


def test_jsonl_round_trip_keeps_fields_pixels_and_shared_images(tmp_path):
    originals = _records(5, shared=(3,))
    originals.append(MedVQARecord(id="bytes", image=_png_bytes(77), question="b?", options={"A": "1", "B": "2"},
                                  answer="B", modality="CT", source="other"))
    path = save_jsonl(originals, str(tmp_path / "data" / "set.jsonl"), str(tmp_path / "data" / "img"))
    loaded, report = load_jsonl(str(path))
    assert report.skipped == [] and report.loaded == 6
    fields = lambda r: (r.id, r.question, r.options, r.answer, r.modality, r.source)  # noqa: E731
    assert [fields(r) for r in loaded] == [fields(r) for r in originals]
    for a, b in zip(originals, loaded):
        assert np.array_equal(np.asarray(a.load_image()), np.asarray(b.load_image())), a.id
    assert loaded[3].image == loaded[0].image != loaded[1].image  # one PNG for the shared image
    assert len(list((tmp_path / "data" / "img").glob("*.png"))) == 5
    first = json.loads(path.read_text().splitlines()[0])
    assert first["image"].startswith("img/") and first["options"] == {"A": "x", "B": "y", "C": "z0"}


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = save_jsonl(_records(3), str(tmp_path / "set.jsonl"), str(tmp_path / "img"))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], '{"id": "r9", "image": ', lines[2]]) + "\n")
    with pytest.raises(LoadError, match=r"set\.jsonl:3: malformed JSON"):
        load_jsonl(str(path))
    path.write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    with pytest.raises(LoadError, match=r"set\.jsonl: record id 'r1' appears more than once"):
        load_jsonl(str(path))
    rec = json.loads(lines[2])
    del rec["question"]
    path.write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(LoadError, match=r"set\.jsonl:2: missing key 'question'"):
        load_jsonl(str(path))


def test_jsonl_answer_must_be_a_letter(tmp_path):
    path = save_jsonl(_records(2), str(tmp_path / "set.jsonl"), str(tmp_path / "img"))
    rec = json.loads(path.read_text().splitlines()[1])
    rec["answer"] = "y"  # the text of option B: our format stores letters only
    path.write_text(path.read_text().splitlines()[0] + "\n" + json.dumps(rec) + "\n")
    records, report = load_jsonl(str(path))
    assert [r.id for r in records] == ["r0"] and _skips(report) == [("r1", ANSWER_NOT_IN_OPTIONS)]


# ---------------------------------------------------------------- Hugging Face datasets

def test_hf_dataset_from_list_and_load_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"image": _scan(i), "question": f"q{i}", "options": ["Yes", "No", "Maybe"][: 2 + i % 2],
             "answer": ["Yes", "B", "No", "Nope"][i], "subset": [MR, CT, MR, XR][i]} for i in range(4)]
    ds = datasets.Dataset.from_list(rows)
    records, report = load_hf_dataset(ds)
    assert [r.id for r in records] == ["hf-0", "hf-1", "hf-2"]
    assert [r.answer for r in records] == ["A", "B", "B"]
    assert [r.modality for r in records] == ["MRI", "CT", "MRI"]
    assert isinstance(records[0].image, bytes)  # kept undecoded until a prompt is built
    assert np.array_equal(np.asarray(records[2].load_image().convert("L")), np.asarray(_scan(2)))
    assert _skips(report) == [("hf-3", ANSWER_NOT_IN_OPTIONS)]

    datasets.DatasetDict({"train": ds, "test": ds.select([0, 2])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(LoadError, match=r"holds splits \['train', 'test'\]"):
        load_hf_dataset(str(tmp_path / "dd"))
    test_split, _ = load_hf_dataset(str(tmp_path / "dd"), split="test", modalities=["MRI"])
    assert [r.id for r in test_split] == ["dd-0", "dd-1"]
    via_folder, _ = load_records("hf", str(tmp_path / "dd" / "train"), modalities=["CT"])
    assert [(r.id, r.answer) for r in via_folder] == [("train-1", "B")]


def test_hf_dataset_bytes_paths_dict_options_and_ids(tmp_path):
    datasets = pytest.importorskip("datasets")
    _png(tmp_path / "pics" / "a.png", 1)
    rows = [
        {"id": "k0", "image": _png_bytes(5), "options": {"A": "x", "B": "y", "C": None}, "answer": "y"},
        {"id": "k1", "image": b"garbage", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "A"},
        {"id": "k2", "image": _png_bytes(6), "options": {"A": None, "B": None, "C": None}, "answer": "A"},
    ]
    ds = datasets.Dataset.from_list([dict(r, question="q", modality="CT") for r in rows])
    records, report = load_hf_dataset(ds)
    assert [(r.id, r.answer, r.options) for r in records] == [("k0", "B", {"A": "x", "B": "y"})]
    assert _skips(report) == [("k1", UNREADABLE_IMAGE), ("k2", NO_OPTIONS)]
    by_path = datasets.Dataset.from_list([
        {"img": "a.png", "question": "q", "choices": ["x", "y"], "label": "x"},
        {"img": "b.png", "question": "q", "choices": ["x", "y"], "label": "y"}])
    records, report = load_hf_dataset(by_path, columns={"image": "img", "answer": "label"},
                                      image_root=str(tmp_path / "pics"))
    assert [(r.id, r.image) for r in records] == [("hf-0", str(tmp_path / "pics" / "a.png"))]
    assert _skips(report) == [("hf-1", MISSING_IMAGE)]
    with pytest.raises(LoadError, match=r"no answer column .* columns are \['img', 'question', 'choices', 'label'\]"):
        load_hf_dataset(by_path, columns={"image": "img"})


# ---------------------------------------------------------------- subsets, splits, dispatch

def test_seeded_subset_is_deterministic_per_seed():
    recs = _records(30)
    a, b = seeded_subset(recs, 10, seed=42), seeded_subset(recs, 10, seed=42)
    assert [r.id for r in a] == [r.id for r in b] and len(a) == 10 and len({r.id for r in a}) == 10
    other = seeded_subset(recs, 30, seed=7)
    assert [r.id for r in seeded_subset(recs, 30, seed=42)] != [r.id for r in other]
    assert sorted(r.id for r in other) == sorted(r.id for r in recs)
    assert len(seeded_subset(recs, 100, seed=42)) == 30
    with pytest.raises(ValueError, match="at least 1"):
        seeded_subset(recs, 0)


def test_split_by_image_keeps_images_disjoint():
    recs = _records(12, shared=(4, 8, 11))  # four questions on record 0's image
    train, test = split_by_image(recs, 0.3, seed=3)
    train_imgs = {image_identity(r) for r in train}
    test_imgs = {image_identity(r) for r in test}
    assert not train_imgs & test_imgs
    assert len(train_imgs) + len(test_imgs) == 9 and len(test_imgs) == round(0.3 * 9)
    assert sorted(r.id for r in train + test) == sorted(r.id for r in recs)
    shared = {"r0", "r4", "r8", "r11"}
    assert shared <= {r.id for r in train} or shared <= {r.id for r in test}
    assert [r.id for r in train] == [r.id for r in recs if r in train]  # input order kept
    assert split_by_image(recs, 0.3, seed=3)[1] == test
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_image(recs, 1.5)


def test_split_by_image_groups_same_path(huatuo_file):
    records, _ = load_huatuo_eval(str(huatuo_file))
    dup = MedVQARecord(id="again", image=str(huatuo_file.parent / "images" / ".." / "images" / "img0.png"),
                       question="q", options={"A": "a"}, answer="A")
    train, test = split_by_image(records + [dup], 0.5, seed=0)
    side = train if records[0] in train else test
    assert dup in side


def test_load_records_dispatch_subset_and_errors(omni_root, huatuo_file):
    records, report = load_records("omnimedvqa", str(omni_root), modalities=["MRI", "CT"])
    assert [r.id for r in records] == ["mri-0", "mri-1", "ct-0"] and report.loaded == 3
    assert report.not_asked == {XR: 1, "Fundus Photography": 1}  # named as the file spells them
    huatuo, _ = load_records("huatuo", str(huatuo_file), modalities=["X-ray"])
    assert [r.answer for r in huatuo] == ["A"]
    with pytest.raises(LoadError, match="'synthetic' is generated"):
        load_records("synthetic", None)
    with pytest.raises(LoadError, match="unknown data source 'csv'"):
        load_records("csv", "x.csv")
    with pytest.raises(LoadError, match="needs data.path"):
        load_records("jsonl", None)
