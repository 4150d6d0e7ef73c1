"""Records from any Hugging Face `datasets` data set whose columns match the record type."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from medvqa.record_checks import (
    UNKNOWN_MODALITY, Draft, LoadError, LoadReport, finish_drafts, first_present, missing_path_error,
)

HF_COLUMNS = {"image": ("image", "images", "image_path"), "question": ("question",), "options": ("options", "choices"),
              "answer": ("answer", "gt_answer"), "modality": ("modality", "subset", "modality_type"),
              "id": ("id", "question_id"), "source": ("source", "dataset")}
_HF_REQUIRED = ("image", "question", "options", "answer")


def _open_hf(dataset_or_path: Any, split: Optional[str]):
    """(Dataset, origin for messages, folder that relative image paths start from)."""
    import datasets  # heavy import: only when a Hugging Face data set is asked for

    ds, origin, base = dataset_or_path, str(dataset_or_path), Path.cwd()
    if isinstance(ds, (datasets.Dataset, datasets.DatasetDict)):
        origin = f"<in-memory {type(ds).__name__}>"
    elif isinstance(ds, (str, Path)):
        base = Path(ds)
        if not base.exists():
            raise missing_path_error(base, "folder (expected a data set saved with save_to_disk)")
        if not base.is_dir():
            raise LoadError(f"{base}: not a folder (expected a data set saved with save_to_disk)")
        try:
            ds = datasets.load_from_disk(str(base))
        except Exception as exc:  # datasets raises several types for folders that are not data sets
            raise LoadError(f"{base}: cannot be loaded with datasets.load_from_disk: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) != 1:
            raise LoadError(f"{origin}: holds splits {list(ds)}; pass split= or point at one split's folder")
        name = split if split is not None else next(iter(ds))
        if name not in ds:
            raise LoadError(f"{origin}: has no split {name!r}; splits are {list(ds)}")
        ds = ds[name]
    if not isinstance(ds, datasets.Dataset):
        raise LoadError(f"{origin}: expected a datasets.Dataset, DatasetDict or a folder, got {type(ds).__name__}")
    return ds, origin, base


def _hf_columns(ds, columns: Optional[dict], origin: str) -> dict:
    """Our field name -> column name (fields without a column are left out)."""
    chosen = {}
    for name, aliases in HF_COLUMNS.items():
        wanted = (columns or {}).get(name)
        found = [wanted] if wanted else [c for c in aliases if c in ds.column_names][:1]
        if wanted and wanted not in ds.column_names:
            raise LoadError(f"{origin}: column {wanted!r} (for {name}) not found; columns are {ds.column_names}")
        if found:
            chosen[name] = found[0]
        elif name in _HF_REQUIRED:
            raise LoadError(f"{origin}: no {name} column (looked for {list(aliases)}); columns are {ds.column_names}")
    return chosen


def _hf_draft(row: dict, index: int, cols: dict, base: Path, origin: str, stem: str) -> Draft:
    def get(name):
        value = row[cols[name]] if name in cols else None
        return None if value is None or str(value).strip() == "" else value

    rid = f"{stem}-{index}" if get("id") is None else str(get("id"))
    # A row whose chosen modality column is empty may still name it in another alias column.
    chosen = [cols["modality"]] if "modality" in cols else []
    modality_keys = chosen + [c for c in HF_COLUMNS["modality"] if c in row]
    return Draft(
        id=rid, file=origin, image=row[cols["image"]], base=base,
        question=str(get("question") or ""), options=row[cols["options"]], answer=get("answer"),
        modality=first_present(row, modality_keys, UNKNOWN_MODALITY), source=str(get("source") or stem))


def load_hf_dataset(dataset_or_path: Any, split: Optional[str] = None, modalities: Optional[Sequence[str]] = None,
                    columns: Optional[dict] = None, image_root: Optional[str] = None):
    """Any Hugging Face `datasets` Dataset/DatasetDict, or a folder saved with `save_to_disk`.

    Columns (aliases in HF_COLUMNS, or `columns={"answer": "label", ...}`): image (PIL, bytes, Image
    feature, a path relative to `image_root` / the folder, or a one-element list); question; options (list
    or letter dict); answer (option text or letter); optional modality, id, source.
    Image columns are read undecoded (bytes) so that no pixels are decoded at load time.
    """
    import datasets

    ds, origin, base = _open_hf(dataset_or_path, split)
    cols = _hf_columns(ds, columns, origin)
    if isinstance(ds.features.get(cols["image"]), datasets.Image):
        ds = ds.cast_column(cols["image"], datasets.Image(decode=False))
    base = Path(image_root) if image_root is not None else base
    stem = Path(str(dataset_or_path)).name if isinstance(dataset_or_path, (str, Path)) else "hf"
    drafts = [_hf_draft(row, i, cols, base, origin, stem) for i, row in enumerate(ds)]
    return finish_drafts(drafts, LoadReport(origin), modalities)
