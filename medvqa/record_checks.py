"""From a row as a public file stores it to a checked MedVQARecord, and the LoadReport of what was skipped.

Every loader (`medvqa.loaders`, `medvqa.hf_loader`) turns its rows into Drafts and hands them to
`finish_drafts`, so all formats check options, answers and images the same way. A single unusable row
(image missing or unreadable, no options, answer not among its options) is skipped, logged and listed in
the report, since public sets do hold a few broken rows; images stay paths and are only verified
(`PIL.Image.verify`, once per file); an empty result is a LoadError.
"""
from __future__ import annotations

import dataclasses
import difflib
import io
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence

from PIL import Image

from medvqa.record import LETTERS, MedVQARecord

log = logging.getLogger("medvqa.loaders")

# Reasons a record is skipped (the values of SkippedRecord.reason).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
MULTIPLE_IMAGES = "multiple_images"  # the record type holds one image; dropping the others would change the question
NO_OPTIONS = "no_options"
TOO_MANY_OPTIONS = "too_many_options"  # more than the ten letters A-J
INVALID_OPTIONS = "invalid_options"  # neither a list nor a letter -> text mapping
ANSWER_NOT_IN_OPTIONS = "answer_not_in_options"
AMBIGUOUS_ANSWER = "ambiguous_answer"  # the answer text equals more than one option

UNKNOWN_MODALITY = "unknown"  # the label of a record whose file names no modality
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
    modality: str = ""  # the record's modality as its file spells it


@dataclasses.dataclass
class LoadReport:
    origin: str  # the file, folder or data set that was read
    loaded: int = 0  # usable records returned by the loader
    skipped: list = dataclasses.field(default_factory=list)  # a SkippedRecord per unusable record
    read: Counter = dataclasses.field(default_factory=Counter)  # source spelling -> records read, all of them
    not_asked: Counter = dataclasses.field(default_factory=Counter)  # source spelling -> records of modalities
    #                                                                  not asked for (not checked; not a fault)

    @property
    def filtered_out(self) -> int:
        return sum(self.not_asked.values())

    def counts(self) -> dict:
        """Skipped records by reason."""
        return dict(Counter(s.reason for s in self.skipped))

    def skip(self, record_id: str, file: str, reason: str, detail: str = "", modality: str = "") -> None:
        self.skipped.append(SkippedRecord(record_id, str(file), reason, detail, modality))
        log.warning("skipping record %r in %s: %s (%s)", record_id, file, reason, detail)

    def to_dict(self) -> dict:
        """For summary files: totals, skipped counts by reason and every skipped record."""
        return {"origin": self.origin, "read": sum(self.read.values()), "loaded": self.loaded,
                "skipped": len(self.skipped), "skipped_by_reason": self.counts(),
                "not_asked_for": dict(self.not_asked), "read_by_source_modality": dict(self.read),
                "skipped_records": [s._asdict() for s in self.skipped]}


class _Unusable(Exception):
    """Raised while building one record; turned into a SkippedRecord."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Draft:
    """One record as read from its file, before its options, answer and image are checked."""

    id: str
    file: str
    image: Any  # as stored: a path (relative to `base`), bytes, a PIL image, a {"bytes", "path"} dict or a list
    base: Path  # folder that relative image paths start from
    question: str
    options: Any  # a list (letters in order) or a letter -> text dict
    answer: Any  # a letter or an option text (see _answer_letter)
    modality: str  # as the file spells it ("MR (Mag-netic Resonance Imaging)"); UNKNOWN_MODALITY if absent
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


def first_present(rec: dict, keys: Sequence[str], default: str = UNKNOWN_MODALITY) -> str:
    """The first of `keys` that the record holds with a non-empty value, as text (an id 0 counts);
    public files differ in which key names the modality: OmniMedVQA's `Chest CT Scan.json` has a
    `modality` where the others have `modality_type`."""
    for key in keys:
        value = rec.get(key)
        if value is not None and str(value).strip():
            return str(value)
    return default


def missing_path_error(path: Path, expected: str) -> LoadError:
    """A LoadError for a path that does not exist, naming the files of similar name beside it
    (the published evaluation file is spelt `medical_multimodel_...`, an easy one to mistype)."""
    parent = path.parent
    if not parent.is_dir():
        return LoadError(f"{path}: no such {expected} (its folder {parent} does not exist either)")
    names = sorted(os.listdir(parent))
    close = difflib.get_close_matches(path.name, names, n=5, cutoff=0.6)
    hint = f"; similar names in {parent}: {', '.join(close)}" if close else f"; {parent} holds {len(names)} entries"
    return LoadError(f"{path}: no such {expected}{hint}")


def _answer_letter(options: dict, answer: Any, letter_only: bool = False) -> str:
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


def _build(d: Draft, modality: str, cache: dict) -> MedVQARecord:
    options = _options_dict(d.options)
    letter = _answer_letter(options, d.answer, d.letter_only)
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


def finish_drafts(drafts: Iterable[Draft], report: LoadReport, modalities: Optional[Sequence[str]],
                  strict_ids: bool = False) -> tuple:
    """(records, report): keep the `modalities` asked for (all when None), check each record, skip the
    unusable ones; a LoadError when nothing is left."""
    wanted = None if modalities is None else {normalize_modality(m) for m in modalities}
    cache, records = {}, []
    for d in _unique_ids(list(drafts), strict_ids):
        modality = normalize_modality(d.modality)
        report.read[d.modality] += 1
        if wanted is not None and modality not in wanted:
            report.not_asked[d.modality] += 1
            continue
        try:
            records.append(_build(d, modality, cache))
        except _Unusable as bad:
            report.skip(d.id, d.file, bad.reason, bad.detail, d.modality)
    report.loaded = len(records)
    if not records:
        why = f"{len(report.skipped)} skipped {report.counts()}"
        if wanted is not None:
            why += f"; asked for modalities {sorted(wanted)}, found {dict(report.read)}"
        raise LoadError(f"{report.origin}: no usable records ({why})")
    level = logging.WARNING if report.skipped else logging.INFO
    log.log(level, "%s: loaded %d records, skipped %d %s", report.origin, len(records), len(report.skipped),
            report.counts())
    if report.not_asked:
        log.info("%s: left out %d records of modalities not asked for: %s", report.origin, report.filtered_out,
                 dict(report.not_asked))
    return records, report
