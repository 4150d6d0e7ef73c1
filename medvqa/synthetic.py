"""Built-in synthetic scans: procedurally drawn MRI-, CT- and X-ray-like images with multiple-choice questions.

Every question is answerable only from the pixels: its text depends on the question type and the
number of options alone, the answer letters are balanced, and lesions are drawn at full intensity
(1.0) on anatomy that never exceeds ANATOMY_MAX, so the answer can be recomputed from the image.
"Left" and "right" are the viewer's, as the image is displayed.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from medvqa.record import LETTERS, MedVQARecord
from medvqa.scan_styles import STYLES, draw_anatomy

from protocol.config import DataConfig

QUESTION_TYPES = ("location", "count", "brighter", "contrast")
SPLITS = ("train", "test")
LESION_VALUE = 1.0
BRIGHTER_OFFSET = 0.25  # added to the brighter region; larger than any left/right imbalance of the anatomy
COUNT_VALUES = tuple(str(i) for i in range(1, 7))
CONTRAST_VALUES = ("bright", "dark")  # the lesion against the tissue around it

_HALVES = ("left", "right")
_QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
_GRID3 = ("upper left", "upper center", "upper right", "middle left", "center", "middle right",
          "lower left", "lower center", "lower right")


@dataclass(frozen=True)
class Layout:
    """Regions of the image a question names: a rows x cols grid, named row by row."""
    rows: int
    cols: int
    names: tuple

    def cell(self, index: int, size: int) -> tuple[float, float, float, float]:
        """(y0, y1, x0, x1) of region `index` in pixels."""
        r, c = divmod(index, self.cols)
        h, w = size / self.rows, size / self.cols
        return r * h, (r + 1) * h, c * w, (c + 1) * w


HALVES = Layout(1, 2, _HALVES)
QUADRANTS = Layout(2, 2, _QUADRANTS)
GRID3 = Layout(3, 3, _GRID3)


def layout_for(question_type: str, num_options: int) -> Optional[Layout]:
    """The region grid a location or brightness question uses for `num_options` options (None for count)."""
    if question_type in ("count", "contrast"):
        return None
    if num_options <= 2:
        return HALVES
    if question_type == "brighter" or num_options <= 4:
        return QUADRANTS
    return GRID3


def question_for(question_type: str, layout: Optional[Layout]) -> str:
    """The question text: fixed per type and grid, so it says nothing about the answer."""
    if question_type == "location":
        return "Where is the lesion?"
    if question_type == "count":
        return "How many lesions are there?"
    if question_type == "contrast":
        return "Is the lesion bright or dark?"
    return "Which side is brighter?" if layout is HALVES else "Which part is brightest?"


def option_values(question_type: str, num_options: int) -> tuple:
    if question_type == "contrast":
        return CONTRAST_VALUES
    layout = layout_for(question_type, num_options)
    return COUNT_VALUES if layout is None else layout.names


def choose_options(rng: np.random.Generator, values: Sequence[str], k: int, letter: int,
                   shuffle: bool) -> tuple[list[str], int]:
    """k option texts from `values` with the true one at position `letter`; returns (options, true index in values).

    Unshuffled options keep the canonical order of `values` (left before right, 1 before 2), so
    the true value is drawn among those that can sit at `letter` in that order.
    """
    m = len(values)
    if shuffle:
        truth = int(rng.integers(m))
        others = [v for i, v in enumerate(values) if i != truth]
        picked = [others[i] for i in rng.permutation(len(others))[: k - 1]]
        return picked[:letter] + [values[truth]] + picked[letter:], truth
    truth = int(rng.integers(letter, m - k + letter + 1))
    before = sorted(rng.choice(truth, size=letter, replace=False).tolist()) if letter else []
    after_pool = np.arange(truth + 1, m)
    after = sorted(rng.choice(after_pool, size=k - 1 - letter, replace=False).tolist()) if k - 1 - letter else []
    return [values[i] for i in before] + [values[truth]] + [values[i] for i in after], truth


def _disk(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def draw_location(rng: np.random.Generator, base: np.ndarray, layout: Layout, region: int) -> np.ndarray:
    """One large lesion wholly inside `region`: the high-contrast, easy question."""
    size = base.shape[0]
    y0, y1, x0, x1 = layout.cell(region, size)
    radius = max(2.0, 0.28 * min(y1 - y0, x1 - x0))
    margin = radius + 1.0
    cy = rng.uniform(y0 + margin, y1 - margin)
    cx = rng.uniform(x0 + margin, x1 - margin)
    img = base.copy()
    img[_disk(size, cy, cx, radius)] = LESION_VALUE
    return img


def draw_contrast(rng: np.random.Generator, base: np.ndarray, value: str) -> np.ndarray:
    """One large lesion anywhere near the centre, white or black: its position carries no answer."""
    size = base.shape[0]
    radius = 0.2 * size
    cy, cx = rng.uniform(0.35 * size, 0.65 * size, size=2)
    img = base.copy()
    img[_disk(size, cy, cx, radius)] = LESION_VALUE if value == "bright" else 0.0
    return img


def draw_count(rng: np.random.Generator, base: np.ndarray, count: int) -> np.ndarray:
    """`count` small lesions, separated by a gap so that each is its own connected blob."""
    size = base.shape[0]
    radius = max(2.0, 0.055 * size)
    centres: list[tuple[float, float]] = []
    lo, hi = radius + 1.0, size - radius - 1.0
    for _ in range(10_000):
        if len(centres) == count:
            break
        cy, cx = rng.uniform(lo, hi, size=2)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (2 * radius + 3.0) ** 2 for y, x in centres):
            centres.append((cy, cx))
    if len(centres) != count:
        raise ValueError(f"cannot place {count} separate lesions on a {size} px image; use a larger data.image_size")
    img = base.copy()
    for cy, cx in centres:
        img[_disk(size, cy, cx, radius)] = LESION_VALUE
    return img


def region_means(img: np.ndarray, layout: Layout) -> np.ndarray:
    size = img.shape[0]
    means = []
    for i in range(len(layout.names)):
        y0, y1, x0, x1 = (int(round(v)) for v in layout.cell(i, size))
        means.append(float(img[y0:y1, x0:x1].mean()))
    return np.array(means)


def draw_brighter(rng: np.random.Generator, base: np.ndarray, layout: Layout, region: int) -> np.ndarray:
    """Brighten one region by BRIGHTER_OFFSET; no lesions, so brightness is the only cue."""
    size = base.shape[0]
    y0, y1, x0, x1 = (int(round(v)) for v in layout.cell(region, size))
    img = base.copy()
    img[y0:y1, x0:x1] = np.minimum(img[y0:y1, x0:x1] + BRIGHTER_OFFSET, LESION_VALUE)
    return img


def to_png(img: np.ndarray) -> bytes:
    grey = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(buf, format="PNG")
    return buf.getvalue()


def _record_rng(seed: int, modality: str, split: str, index: int, *extra: int) -> np.random.Generator:
    """One stream per (seed, modality, split, record): train and test never share a draw."""
    return np.random.default_rng([seed, list(STYLES).index(modality), SPLITS.index(split), index, *extra])


def _balanced_letter(seed: int, modality: str, split: str, question_type: str, j: int, k: int) -> int:
    """Letter of the j-th question of a type: each block of k questions uses each letter once."""
    block, pos = divmod(j, k)
    rng = _record_rng(seed, modality, split, block, 1 + QUESTION_TYPES.index(question_type))
    return int(rng.permutation(k)[pos])


def _draw_image(rng: np.random.Generator, modality: str, size: int, question_type: str,
                layout: Optional[Layout], value: str) -> np.ndarray:
    for _ in range(100):
        base = draw_anatomy(modality, rng, size)
        if question_type == "location":
            return draw_location(rng, base, layout, layout.names.index(value))
        if question_type == "count":
            return draw_count(rng, base, int(value))
        if question_type == "contrast":
            return draw_contrast(rng, base, value)
        img = draw_brighter(rng, base, layout, layout.names.index(value))
        means = np.sort(region_means(img, layout))
        # Redraw the rare anatomy whose own imbalance would blur the brightness cue.
        clear = means[-1] - means[-2] >= 0.5 * BRIGHTER_OFFSET
        if clear and region_means(img, layout).argmax() == layout.names.index(value):
            return img
    raise RuntimeError(f"could not draw a clear 'brighter' image for {modality} at {size} px")


def make_record(modality: str, split: str, index: int, j: int, seed: int, question_type: str,
                num_options: int, image_size: int, shuffle_options: bool = True) -> MedVQARecord:
    """Record `index` of a split; it is the j-th of its question type."""
    values = option_values(question_type, num_options)
    k = min(num_options, len(values))
    letter = _balanced_letter(seed, modality, split, question_type, j, k)
    rng = _record_rng(seed, modality, split, index)
    options, truth = choose_options(rng, values, k, letter, shuffle_options)
    layout = layout_for(question_type, num_options)
    img = _draw_image(rng, modality, image_size, question_type, layout, values[truth])
    return MedVQARecord(
        id=f"synthetic-{modality}-{split}-{index:05d}", image=to_png(img),
        question=question_for(question_type, layout),
        options={LETTERS[i]: text for i, text in enumerate(options)}, answer=LETTERS[letter],
        modality=modality, source=f"synthetic/{question_type}",
    )


def _check_args(modality: str, split: str, question_types: Sequence[str], num_options: int, image_size: int):
    if modality not in STYLES:
        raise ValueError(f"unknown synthetic modality {modality!r}; choose one of {sorted(STYLES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    bad = [t for t in question_types if t not in QUESTION_TYPES]
    if bad or not question_types:
        raise ValueError(f"data.question_types {list(question_types)}: choose from {list(QUESTION_TYPES)}")
    if not 2 <= num_options <= len(LETTERS):
        raise ValueError(f"data.num_options must be between 2 and {len(LETTERS)}, got {num_options}")
    if image_size < 28 or image_size % 28:
        raise ValueError(f"data.image_size must be a multiple of 28 (the processor's patch grid), got {image_size}")


def make_synthetic_split(modality: str, split: str, n: int, seed: int, question_types: Sequence[str] = QUESTION_TYPES,
                         num_options: int = 4, image_size: int = 56,
                         shuffle_options: bool = True) -> list[MedVQARecord]:
    """n records of one modality; question types take turns; train and test come from disjoint streams.

    A location question with 2 options asks left/right, with 3-4 a quadrant, with 5+ a 3x3 cell (at
    most 9 options); brightness asks halves or quadrants (at most 4); count asks 1-6 lesions (at most 6).
    With shuffle_options=False the options keep their natural order (left, right; 1, 2, ...).
    """
    _check_args(modality, split, question_types, num_options, image_size)
    types = list(question_types)
    return [make_record(modality, split, i, i // len(types), seed, types[i % len(types)], num_options,
                        image_size, shuffle_options) for i in range(n)]


def synthetic_dataset(data_cfg: DataConfig) -> tuple[list[MedVQARecord], dict[str, list[MedVQARecord]]]:
    """Train records of data_cfg.train_modalities (data_cfg.num_train in all, default 600), and
    data_cfg.num_eval_per_modality test records for each of data_cfg.eval_modalities."""
    total = data_cfg.num_train if data_cfg.num_train is not None else 600
    mods = list(data_cfg.train_modalities)
    if not mods:
        raise ValueError("data.train_modalities is empty")
    shuffle = bool(getattr(data_cfg, "shuffle_options", True))
    common = dict(seed=data_cfg.seed, question_types=list(data_cfg.question_types), num_options=data_cfg.num_options,
                  image_size=data_cfg.image_size, shuffle_options=shuffle)
    train: list[MedVQARecord] = []
    for i, m in enumerate(mods):
        n = total // len(mods) + (1 if i < total % len(mods) else 0)
        train += make_synthetic_split(m, "train", n, **common)
    if len(mods) > 1:
        order = np.random.default_rng(data_cfg.seed).permutation(len(train))
        train = [train[i] for i in order]
    evals = {m: make_synthetic_split(m, "test", data_cfg.num_eval_per_modality, **common)
             for m in data_cfg.eval_modalities}
    return train, evals
