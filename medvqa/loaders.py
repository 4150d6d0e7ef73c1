"""Loaders for public medical-VQA formats; each returns MedVQARecords and a LoadReport of what it skipped.

Formats: OmniMedVQA, the HuatuoGPT-Vision evaluation set, our own JSONL and any Hugging Face `datasets`
table; `load_records` dispatches on `cfg.data.source`. All behave alike: a file that cannot be read as its
format (malformed JSON, a missing required key) is a LoadError naming the file and line or record, since
nothing after it can be trusted; a single unusable record (image missing or unreadable, no options, answer
not among its options) is skipped, logged and listed in the report, since public sets do hold a few broken
rows; images stay paths and are only verified (`PIL.Image.verify`, once per file); an empty result is a
LoadError.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence

from PIL import Image

from medvqa.record import LETTERS, MedVQARecord
from medvqa.splits import image_identity, seeded_subset, split_by_image  # noqa: F401  (part of this module's API)

log = logging.getLogger(__name__)

# Reasons a record is skipped (the values of SkippedRecord.reason).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
MULTIPLE_IMAGES = "multiple_images"  # the record type holds one image; dropping the others would change the question
NO_OPTIONS = "no_options"
TOO_MANY_OPTIONS = "too_many_options"  # more than the ten letters A-J
INVALID_OPTIONS = "invalid_options"  # neither a list nor a letter -> text mapping
ANSWER_NOT_IN_OPTIONS = "answer_not_in_options"
AMBIGUOUS_ANSWER = "ambiguous_answer"  # the answer text equals more than one option

SOURCES = ("jsonl", "omnimedvqa", "huatuo", "hf")
# Columns looked for in a Hugging Face data set, first match wins; `columns=` overrides them.
# (label, squashed spellings that are exactly it, substrings that mark it); squashed = lower-case letters only.
_MODALITY_RULES = (
    ("MRI", ("mr", "mri"), ("magneticresonance",)),
    ("CT", ("ct",), ("computedtomography",)),
    ("X-ray", ("xray",), ("xray",)),
)


class LoadError(ValueError):
    """A data set that cannot be loaded; the message names the file or root (and the line or record)."""


class SkippedRecord(NamedTuple):
    id: str  # the record's id (given by the data or derived as file stem + index)
    file: str  # the file the record was read from
    reason: str  # one of the reason constants above
    detail: str = ""  # what exactly was wrong, for the log


@dataclasses.dataclass
class LoadReport:
    origin: str  # the file, folder or data set that was read
    loaded: int = 0  # usable records returned by the loader (before any seeded subset)
    filtered_out: int = 0  # records of modalities not asked for; not a fault
    skipped: list = dataclasses.field(default_factory=list)  # a SkippedRecord per unusable record

    def counts(self) -> dict:
        """Skipped records by reason."""
        return dict(Counter(s.reason for s in self.skipped))

    def skip(self, record_id: str, file: str, reason: str, detail: str = "") -> None:
        self.skipped.append(SkippedRecord(record_id, str(file), reason, detail))
        log.warning("skipping record %r in %s: %s (%s)", record_id, file, reason, detail)


class _Unusable(Exception):
    """Raised while building one record; turned into a SkippedRecord."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class _Draft:
    """One record as read from its file, before its options, answer and image are checked."""

    id: str
    file: str
    image: Any  # as stored: a path (relative to `base`), bytes, a PIL image, a {"bytes", "path"} dict or a list
    base: Path  # folder that relative image paths start from
    question: str
    options: Any  # a list (letters in order) or a letter -> text dict
    answer: Any  # a letter or an option text (see answer_letter)
    modality: str
    source: str
    letter_only: bool = False  # our own JSONL stores letters only


def normalize_modality(label: str) -> str:
    """Our label for a modality spelling: "MR (Mag-netic Resonance Imaging)" -> "MRI", "CT(Computed
    Tomography)" -> "CT", "X-Ray" -> "X-ray"; an unknown label is returned as given (stripped)."""
    squashed = re.sub(r"[^a-z]", "", str(label).lower())
    for ours, exact, marks in _MODALITY_RULES:
        if squashed in exact or any(m in squashed for m in marks):
            return ours
    return str(label).strip()


def answer_letter(options: dict, answer: Any, letter_only: bool = False) -> str:
    """The letter of `options` that `answer` designates; raises _Unusable when none or several do.

    Precedence: an option text equal to the answer (exactly, then ignoring case and outer spaces); then a
    bare letter that is a key ("B", "b", " B "). Text goes first because the public formats store the
    answer as text, so an option whose text is a single letter keeps its meaning. `letter_only` accepts
    only a key (our JSONL stores letters).
    """
    text = str(answer).strip()
    if not letter_only:
        for same in (lambda v: str(v) == str(answer), lambda v: str(v).strip().lower() == text.lower()):
            hits = [k for k, v in options.items() if same(v)]
            if len(hits) > 1:
                raise _Unusable(AMBIGUOUS_ANSWER, f"answer {answer!r} equals options {hits}")
            if hits:
                return hits[0]
    letter = text.upper() if not letter_only else text
    if len(letter) == 1 and letter in options:
        return letter
    raise _Unusable(ANSWER_NOT_IN_OPTIONS, f"answer {answer!r} is not among options {options}")


def _options_dict(raw: Any) -> dict:
    """Letter -> text; a list gets letters in order; empty texts (absent options) are dropped."""
    if isinstance(raw, dict):
        pairs = [(str(k).strip().upper(), v) for k, v in raw.items()]
    elif isinstance(raw, (list, tuple)):
        if len(raw) > len(LETTERS):
            raise _Unusable(TOO_MANY_OPTIONS, f"{len(raw)} options, at most {len(LETTERS)}")
        pairs = list(zip(LETTERS, raw))
    else:
        raise _Unusable(INVALID_OPTIONS, f"options are a {type(raw).__name__}, not a list or dict")
    out = {k: str(v) for k, v in pairs if v is not None and str(v).strip() != ""}
    bad = [k for k in out if len(k) != 1 or k not in LETTERS]
    if bad:
        raise _Unusable(INVALID_OPTIONS, f"option keys {bad} are not letters A-J")
    if not out:
        raise _Unusable(NO_OPTIONS, "the record has no options")
    return out


def _image_source(raw: Any, base: Path):
    """A path string, bytes or PIL image from the ways formats store an image."""
    if isinstance(raw, (list, tuple)):
        if len(raw) > 1:
            raise _Unusable(MULTIPLE_IMAGES, f"{len(raw)} images")
        raw = raw[0] if raw else None
    if isinstance(raw, dict):  # a Hugging Face Image column read with decode=False
        raw = raw.get("bytes") or raw.get("path")
    if isinstance(raw, (Image.Image, bytes, bytearray)):
        return raw
    if raw is None or str(raw).strip() == "":
        raise _Unusable(MISSING_IMAGE, "the record names no image")
    return str(base / str(raw))  # an absolute path stays as it is


def _verify(src, name: str) -> Optional[tuple]:
    try:
        with Image.open(src) as im:
            im.verify()  # reads headers and checksums, not pixels: cheap enough for every record
    except Exception as exc:  # PIL raises many exception types on bad data; each means unreadable
        return UNREADABLE_IMAGE, f"{name}: {type(exc).__name__}: {exc}"
    return None


def _image_problem(image, cache: dict) -> Optional[tuple]:
    """(reason, detail) when the image is missing or unreadable; checked once per file."""
    if isinstance(image, Image.Image):
        return None
    if isinstance(image, (bytes, bytearray)):
        return _verify(io.BytesIO(image), "image bytes")
    if image not in cache:
        exists = Path(image).is_file()
        cache[image] = _verify(image, image) if exists else (MISSING_IMAGE, f"no file {image}")
    return cache[image]


def _build(d: _Draft, modality: str, cache: dict) -> MedVQARecord:
    options = _options_dict(d.options)
    letter = answer_letter(options, d.answer, d.letter_only)
    image = _image_source(d.image, d.base)
    problem = _image_problem(image, cache)
    if problem:
        raise _Unusable(*problem)
    return MedVQARecord(id=d.id, image=image, question=d.question, options=options, answer=letter,
                        modality=modality, source=d.source)


def _unique_ids(drafts: list, strict: bool) -> list:
    """Duplicate ids are an error in our own format; elsewhere later copies get a "#n" suffix."""
    seen: Counter = Counter()
    for d in drafts:
        seen[d.id] += 1
        if seen[d.id] > 1:
            if strict:
                raise LoadError(f"{d.file}: record id {d.id!r} appears more than once")
            d.id = f"{d.id}#{seen[d.id]}"
    return drafts


def _finish(drafts: Iterable, report: LoadReport, modalities: Optional[Sequence[str]], strict_ids=False):
    """Filter by modality, check each record, skip the unusable ones; error if nothing is left."""
    wanted = None if modalities is None else {normalize_modality(m) for m in modalities}
    found, cache, records = Counter(), {}, []
    for d in _unique_ids(list(drafts), strict_ids):
        modality = normalize_modality(d.modality)
        found[modality] += 1
        if wanted is not None and modality not in wanted:
            report.filtered_out += 1
            continue
        try:
            records.append(_build(d, modality, cache))
        except _Unusable as bad:
            report.skip(d.id, d.file, bad.reason, bad.detail)
    report.loaded = len(records)
    if not records:
        why = f"{len(report.skipped)} skipped {report.counts()}"
        if wanted is not None:
            why += f"; asked for modalities {sorted(wanted)}, found {dict(found)}"
        raise LoadError(f"{report.origin}: no usable records ({why})")
    level = logging.WARNING if report.skipped else logging.INFO
    log.log(level, "%s: loaded %d records, skipped %d %s", report.origin, len(records), len(report.skipped),
            report.counts())
    return records, report


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

    Ids are the records' `question_id` (else file stem + index); gt_answer is the option text.
    """
    root_path = Path(root)
    qa = root_path / "QA_information"
    files = sorted(p for a in access for p in (qa / a).glob("*.json"))
    if not files:
        raise LoadError(f"{root}: not an OmniMedVQA root (no QA_information/{{{','.join(access)}}}/*.json)")
    drafts = []
    for f in files:
        for i, rec in enumerate(_read_json_list(f)):
            rid = str(rec.get("question_id") or f"{f.stem}-{i}")
            where = f"{f}: record {i} ({rid})"
            options = {c: rec.get(f"option_{c}") for c in LETTERS if f"option_{c}" in rec}
            drafts.append(_Draft(
                id=rid, file=str(f), image=_key(rec, "image_path", where), base=root_path,
                question=str(_key(rec, "question", where)), options=options, answer=_key(rec, "gt_answer", where),
                modality=str(rec.get("modality_type", "unknown")), source=str(rec.get("dataset") or f.stem)))
    return _finish(drafts, LoadReport(str(root)), modalities)


def _json_files(path: Path) -> list:
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise LoadError(f"{path}: folder holds no *.json file")
        return files
    if not path.is_file():
        raise LoadError(f"{path}: no such file or folder")
    return [path]


def load_huatuo_eval(path: str, modalities: Optional[Sequence[str]] = None):
    """The HuatuoGPT-Vision evaluation format: a JSON list (or a folder of them), images relative to the file.

    Options get letters in list order; the answer is an option text, or else a bare letter of one of
    the options (see answer_letter). Ids are `id` when present, else `<file stem>-<index>`. The modality
    is `subset`; the source is `dataset`.
    """
    drafts = []
    for f in _json_files(Path(path)):
        for i, rec in enumerate(_read_json_list(f)):
            rid = str(rec.get("id") or f"{f.stem}-{i}")
            where = f"{f}: record {i} ({rid})"
            drafts.append(_Draft(
                id=rid, file=str(f), image=_key(rec, "image", where), base=f.parent,
                question=str(_key(rec, "question", where)), options=_key(rec, "options", where),
                answer=_key(rec, "answer", where), modality=str(rec.get("subset", "unknown")),
                source=str(rec.get("dataset") or f.name)))
    return _finish(drafts, LoadReport(str(path)), modalities)


def _jsonl_draft(line: str, path: Path, lineno: int) -> _Draft:
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LoadError(f"{where}: malformed JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(rec, dict):
        raise LoadError(f"{where}: expected an object, found a {type(rec).__name__}")
    return _Draft(
        id=str(_key(rec, "id", where)), file=str(path), image=_key(rec, "image", where), base=path.parent,
        question=str(_key(rec, "question", where)), options=_key(rec, "options", where),
        answer=_key(rec, "answer", where), modality=str(rec.get("modality", "unknown")),
        source=str(rec.get("source") or path.name), letter_only=True)


def load_jsonl(path: str, modalities: Optional[Sequence[str]] = None):
    """Our own format, one record per line: {"id", "image" (relative to the file's folder), "question",
    "options": {"A": ...}, "answer": letter, "modality", "source"}; modality and source are optional
    ("unknown" and the file name). Duplicate ids are an error."""
    p = Path(path)
    if not p.is_file():
        raise LoadError(f"{p}: no such file")
    with p.open(encoding="utf-8") as fh:
        drafts = [_jsonl_draft(line, p, n) for n, line in enumerate(fh, 1) if line.strip()]
    return _finish(drafts, LoadReport(str(p)), modalities, strict_ids=True)


def save_jsonl(records: Sequence[MedVQARecord], path: str, image_dir: str) -> Path:
    """Write records as JSONL and their images as PNG files in `image_dir`, so load_jsonl reads them back.

    Images are named by a hash of their PNG bytes, so questions that share an image still share one file
    (split_by_image keeps relying on that after the round trip).
    """
    out, img_dir = Path(path), Path(image_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    ids = Counter(r.id for r in records)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise LoadError(f"{out}: record ids {dup[:5]} appear more than once")
    lines = []
    for r in records:
        buf = io.BytesIO()
        r.load_image().save(buf, format="PNG")
        png = buf.getvalue()
        target = img_dir / f"{hashlib.sha1(png).hexdigest()[:16]}.png"
        if not target.exists():
            target.write_bytes(png)
        lines.append(json.dumps({
            "id": r.id, "image": os.path.relpath(target, out.parent), "question": r.question,
            "options": r.options, "answer": r.answer, "modality": r.modality, "source": r.source}))
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out


def load_records(source: str, path: Optional[str], modalities: Optional[Sequence[str]] = None,
                 num: Optional[int] = None, seed: int = 42):
    """The config's entry point: load `path` as `source` (cfg.data.source), keep `modalities`, then draw
    a seeded subset of `num` records (all, in file order, when num is None)."""
    from medvqa.hf_loader import load_hf_dataset

    loaders = {"jsonl": load_jsonl, "omnimedvqa": load_omnimedvqa, "huatuo": load_huatuo_eval,
               "hf": load_hf_dataset}
    if source == "synthetic":
        raise LoadError("data source 'synthetic' is generated, not loaded from a file; use the synthetic scans")
    if source not in loaders:
        raise LoadError(f"unknown data source {source!r}; expected one of {list(SOURCES)} or 'synthetic'")
    if path is None:
        raise LoadError(f"data source {source!r} needs data.path (a file or folder)")
    records, report = loaders[source](path, modalities=modalities)
    if num is not None:
        records = seeded_subset(records, num, seed)
    return records, report
