"""Loaders for public medical-VQA formats; each returns MedVQARecords and a LoadReport of what it skipped.

Formats: OmniMedVQA, the HuatuoGPT-Vision evaluation set, our own JSONL and any Hugging Face `datasets`
table (`medvqa.hf_loader`); `load_records` dispatches on `cfg.data.source`. All behave alike (the checks
are in `medvqa.record_checks`): a file that cannot be read as its format (malformed JSON, a missing
required key) is a LoadError naming the file and line or record, since nothing after it can be trusted;
a single unusable record is skipped, logged and listed in the report; an empty result is a LoadError.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from medvqa.hf_loader import load_hf_dataset
from medvqa.record import LETTERS
from medvqa.record_checks import (
    UNKNOWN_MODALITY, Draft, LoadError, LoadReport, finish_drafts, first_present, missing_path_error,
)

SOURCES = ("jsonl", "omnimedvqa", "huatuo", "hf")
# Keys that name a record's modality, first present wins. OmniMedVQA's files use `modality_type`, except
# for records (in `Chest CT Scan.json`) that use `modality`; the HuatuoGPT-Vision set uses `subset`.
OMNIMEDVQA_MODALITY_KEYS = ("modality_type", "modality")
HUATUO_MODALITY_KEYS = ("subset", "modality", "modality_type")


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoadError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path}: cannot be read: {exc}") from None
    if not isinstance(data, list):
        raise LoadError(f"{path}: expected a JSON list of records, found a {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise LoadError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
    return data


def _key(rec: dict, key: str, where: str):
    if key not in rec:
        raise LoadError(f"{where}: missing key {key!r} (keys present: {sorted(rec)})")
    return rec[key]


def load_omnimedvqa(root: str, modalities: Optional[Sequence[str]] = None,
                    access: Sequence[str] = ("Open-access", "Restricted-access")):
    """OmniMedVQA: `<root>/QA_information/<access>/*.json`, image paths relative to `root`.

    Ids are the records' `question_id` (else file stem + index); gt_answer is the option text; the
    modality is `modality_type`, or `modality` where a file spells it so.
    """
    root_path = Path(root)
    if not root_path.exists():
        raise missing_path_error(root_path, "OmniMedVQA folder")
    qa = root_path / "QA_information"
    files = sorted(p for a in access for p in (qa / a).glob("*.json"))
    if not files:
        raise LoadError(f"{root}: not an OmniMedVQA root (no QA_information/{{{','.join(access)}}}/*.json)")
    drafts = []
    for f in files:
        for i, rec in enumerate(_read_json_list(f)):
            rid = first_present(rec, ("question_id",), f"{f.stem}-{i}")
            where = f"{f}: record {i} ({rid})"
            options = {c: rec.get(f"option_{c}") for c in LETTERS if f"option_{c}" in rec}
            drafts.append(Draft(
                id=rid, file=str(f), image=_key(rec, "image_path", where), base=root_path,
                question=str(_key(rec, "question", where)), options=options, answer=_key(rec, "gt_answer", where),
                modality=first_present(rec, OMNIMEDVQA_MODALITY_KEYS), source=str(rec.get("dataset") or f.stem)))
    return finish_drafts(drafts, LoadReport(str(root)), modalities)


def _json_files(path: Path) -> list:
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise LoadError(f"{path}: folder holds no *.json file")
        return files
    if not path.is_file():
        raise missing_path_error(path, "file or folder")
    return [path]


def load_huatuo_eval(path: str, modalities: Optional[Sequence[str]] = None):
    """The HuatuoGPT-Vision evaluation format: a JSON list (or a folder of them), images relative to the file.

    Options get letters in list order; the answer is an option text, or else a bare letter of one of
    the options. Ids are `id` when present, else `<file stem>-<index>`. The modality is `subset` (else
    `modality`); the source is `dataset`. Other keys (the MedVLM-R1 test file's `problem` and
    `solution`) are not read: the prompt is built from question and options.
    """
    drafts = []
    for f in _json_files(Path(path)):
        for i, rec in enumerate(_read_json_list(f)):
            rid = first_present(rec, ("id",), f"{f.stem}-{i}")
            where = f"{f}: record {i} ({rid})"
            drafts.append(Draft(
                id=rid, file=str(f), image=_key(rec, "image", where), base=f.parent,
                question=str(_key(rec, "question", where)), options=_key(rec, "options", where),
                answer=_key(rec, "answer", where), modality=first_present(rec, HUATUO_MODALITY_KEYS),
                source=str(rec.get("dataset") or f.name)))
    return finish_drafts(drafts, LoadReport(str(path)), modalities)


def _jsonl_draft(line: str, path: Path, lineno: int) -> Draft:
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LoadError(f"{where}: malformed JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(rec, dict):
        raise LoadError(f"{where}: expected an object, found a {type(rec).__name__}")
    return Draft(
        id=str(_key(rec, "id", where)), file=str(path), image=_key(rec, "image", where), base=path.parent,
        question=str(_key(rec, "question", where)), options=_key(rec, "options", where),
        answer=_key(rec, "answer", where), modality=str(rec.get("modality", UNKNOWN_MODALITY)),
        source=str(rec.get("source") or path.name), letter_only=True)


def _utf8_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line; a line that is not UTF-8 is a LoadError naming it."""
    lines = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                lines.append((n, raw.decode("utf-8", errors="strict")))
            except UnicodeDecodeError as exc:
                bad = f"byte {raw[exc.start]:#04x} at offset {exc.start} of the line"
                raise LoadError(f"{path}:{n}: not UTF-8 text ({bad})") from None
    return lines


def load_jsonl(path: str, modalities: Optional[Sequence[str]] = None):
    """Our own format, one record per line: {"id", "image" (relative to the file's folder), "question",
    "options": {"A": ...}, "answer": letter, "modality", "source"}; modality and source are optional
    ("unknown" and the file name). Duplicate ids are an error."""
    p = Path(path)
    if not p.is_file():
        raise missing_path_error(p, "file")
    drafts = [_jsonl_draft(line, p, n) for n, line in _utf8_lines(p) if line.strip()]
    return finish_drafts(drafts, LoadReport(str(p)), modalities, strict_ids=True)


def load_records(source: str, path: Optional[str], modalities: Optional[Sequence[str]] = None):
    """The config's entry point: load `path` as `source` (cfg.data.source), keeping `modalities` (all
    when None); records of other modalities are counted in the report's `not_asked`, never checked."""
    loaders = {"jsonl": load_jsonl, "omnimedvqa": load_omnimedvqa, "huatuo": load_huatuo_eval,
               "hf": load_hf_dataset}
    if source == "synthetic":
        raise LoadError("data source 'synthetic' is generated, not loaded from a file; use the synthetic scans")
    if source not in loaders:
        raise LoadError(f"unknown data source {source!r}; expected one of {list(SOURCES)} or 'synthetic'")
    if path is None:
        raise LoadError(f"data source {source!r} needs data.path (a file or folder)")
    return loaders[source](path, modalities=modalities)
