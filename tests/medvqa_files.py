"""Test fixtures written in the public layouts, with tiny numpy-drawn PNGs.

Field names and value styles follow the published files: the HuatuoGPT-Vision evaluation set
(`medical_multimodel_evaluation_data.json`, spelt so, beside `images/`), the MedVLM-R1 authors' test file
(the same records plus `problem` and `solution`), OmniMedVQA (`QA_information/<access>/<source>.json`,
`option_A`.., `gt_answer`, `modality_type` or, in `Chest CT Scan.json`, `modality`) and our own JSONL.
"""
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

MR, CT, XR = "MR (Mag-netic Resonance Imaging)", "CT(Computed Tomography)", "X-Ray"  # the published spellings
OCT = "OCT (Optical Coherence Tomography"  # sic: OmniMedVQA's spelling, closing bracket missing
HUATUO_FILE = "medical_multimodel_evaluation_data.json"
PAPER_TEST_FILE = "MRI_CT_XRAY_300each_dataset.json"


def scan(value: int, size: int = 8) -> Image.Image:
    """A tiny grey square with a bright pixel whose place depends on `value`, so images differ."""
    arr = np.full((size, size), value % 200, dtype=np.uint8)
    arr[value % size, (value // size) % size] = 255
    return Image.fromarray(arr, mode="L")


def png(path: Path, value: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scan(value, size).save(path)
    return path


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    scan(value).save(buf, format="PNG")
    return buf.getvalue()


def huatuo_row(image: str, question: str, options: list, answer: str, subset: str, dataset="OmniMedVQA") -> dict:
    """One record as the HuatuoGPT-Vision evaluation set stores it: a list of one image path, option
    texts, the answer as an option text."""
    return {"image": [image], "question": question, "options": options, "answer": answer, "dataset": dataset,
            "subset": subset}


def paper_test_row(image: str, question: str, options: list, answer: str, subset: str) -> dict:
    """One record of the authors' test file: the HuatuoGPT-Vision keys plus `problem` (question and
    lettered options) and `solution` (the letter)."""
    lines = [f"{'ABCDEFGHIJ'[i]}) {o}" for i, o in enumerate(options)]
    solution = "ABCDEFGHIJ"[options.index(answer)] if answer in options else "?"
    return {"image": [image], "problem": "\n".join([question, *lines]), "solution": solution,
            **huatuo_row(image, question, options, answer, subset)}


def omni_row(qid: str, image: str, modality: str, options: list, gt: str, modality_key="modality_type") -> dict:
    """One OmniMedVQA record; `modality_key="modality"` writes it as `Chest CT Scan.json` does."""
    rec = {"question_id": qid, "question": f"question {qid}?", "gt_answer": gt, "image_path": image,
           modality_key: modality, "question_type": "Modality Recognition", "dataset": "Src"}
    rec.update({f"option_{k}": v for k, v in zip("ABCD", options)})
    return rec


def write_json(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    return path


def write_jsonl(records, path: str, image_dir: str) -> Path:
    """MedVQARecords as our JSONL, their images as PNG files named by a hash of their bytes (questions
    that share an image still share one file)."""
    out, img_dir = Path(path), Path(image_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        buf = io.BytesIO()
        r.load_image().save(buf, format="PNG")
        target = img_dir / f"{hashlib.sha1(buf.getvalue()).hexdigest()[:16]}.png"
        target.write_bytes(buf.getvalue())
        lines.append(json.dumps({
            "id": r.id, "image": os.path.relpath(target, out.parent), "question": r.question,
            "options": r.options, "answer": r.answer, "modality": r.modality, "source": r.source}))
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out
