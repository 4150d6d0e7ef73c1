"""Synthetic scans: deterministic, balanced, disjoint, and every answer recomputable from the pixels alone."""
from collections import Counter, deque

import numpy as np
import pytest

from launcher.config import DataConfig
from medvqa.synthetic import GRID3, HALVES, QUADRANTS, make_synthetic_split, synthetic_dataset

LAYOUTS = {HALVES.names: HALVES, QUADRANTS.names: QUADRANTS, GRID3.names: GRID3}


def _grey(record) -> np.ndarray:
    return np.asarray(record.load_image(), dtype=np.float64)[..., 0] / 255.0


def _layout_of(record):
    names = set(record.options.values())
    return next(layout for key, layout in LAYOUTS.items() if names <= set(key))


def _cell(layout, index, size):
    return [int(round(v)) for v in layout.cell(index, size)]


def _components(mask: np.ndarray) -> int:
    """Connected blobs (8-neighbourhood) by breadth-first search."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return count


def _chi_square(counts: Counter, k: int) -> float:
    n = sum(counts.values())
    return sum((counts.get(c, 0) - n / k) ** 2 / (n / k) for c in "ABCDEFGHIJ"[:k])


def test_same_seed_same_records_other_seed_other_images():
    a = make_synthetic_split("MRI", "train", 30, seed=3)
    b = make_synthetic_split("MRI", "train", 30, seed=3)
    c = make_synthetic_split("MRI", "train", 30, seed=4)
    assert [(r.id, r.image, r.options, r.answer) for r in a] == [(r.id, r.image, r.options, r.answer) for r in b]
    assert sum(x.image == y.image for x, y in zip(a, c)) == 0


@pytest.mark.parametrize("num_options,shuffle", [(4, True), (2, True), (2, False), (3, True), (3, False), (5, True)])
def test_answer_letters_uniform(num_options, shuffle):
    recs = make_synthetic_split("CT", "train", 300, seed=7, num_options=num_options, shuffle_options=shuffle)
    for qtype in ("location", "count", "brighter"):
        sub = [r for r in recs if r.source == f"synthetic/{qtype}"]
        k = len(sub[0].options)
        assert all(len(r.options) == k for r in sub)
        # 95th percentile of chi-square with up to 8 degrees of freedom is below 15.6.
        assert _chi_square(Counter(r.answer for r in sub), k) < 15.6, (qtype, Counter(r.answer for r in sub))


def test_true_values_uniform_and_question_text_carries_no_answer():
    recs = make_synthetic_split("MRI", "train", 600, seed=1, question_types=["location"], num_options=4)
    truths = Counter(r.options[r.answer] for r in recs)
    assert set(truths) == set(QUADRANTS.names)
    assert max(truths.values()) - min(truths.values()) < 60, truths
    assert {r.question for r in recs} == {"Where is the lesion?"}


def test_contrast_questions_fixed_order_and_balanced():
    recs = make_synthetic_split("MRI", "train", 200, seed=5, question_types=["contrast"], num_options=2,
                                shuffle_options=False)
    assert {tuple(r.options.items()) for r in recs} == {(("A", "bright"), ("B", "dark"))}
    assert Counter(r.answer for r in recs) == {"A": 100, "B": 100}
    assert {r.question for r in recs} == {"Is the lesion bright or dark?"}


def test_option_counts_capped_where_meaningful():
    recs = make_synthetic_split("X-ray", "test", 3, seed=0, num_options=10)
    by_type = {r.source.split("/")[1]: len(r.options) for r in recs}
    assert by_type == {"location": 9, "count": 6, "brighter": 4}


@pytest.mark.parametrize("modality", ["MRI", "CT", "X-ray"])
@pytest.mark.parametrize("num_options", [2, 4, 7])
def test_answers_match_pixels(modality, num_options):
    recs = make_synthetic_split(modality, "test", 45, seed=11, num_options=num_options)
    for r in recs:
        img, truth = _grey(r), r.options[r.answer]
        size = img.shape[0]
        qtype = r.source.split("/")[1]
        if qtype == "count":
            assert _components(img > 0.9) == int(truth), r.id
            continue
        if qtype == "contrast":
            # Anatomy stays at or below 0.8: only a bright lesion reaches white, a dark one leaves none.
            bright_area = int((img > 0.9).sum())
            disk_area = np.pi * (0.2 * size) ** 2
            assert (bright_area > 0.8 * disk_area) if truth == "bright" else bright_area == 0, (r.id, truth)
            continue
        layout = _layout_of(r)
        if qtype == "location":
            ys, xs = np.nonzero(img > 0.9)
            assert _components(img > 0.9) == 1, r.id
            y0, y1, x0, x1 = _cell(layout, layout.names.index(truth), size)
            assert y0 <= ys.mean() < y1 and x0 <= xs.mean() < x1, (r.id, truth, ys.mean(), xs.mean())
        else:
            means = [img[y0:y1, x0:x1].mean() for y0, y1, x0, x1 in
                     (_cell(layout, i, size) for i in range(len(layout.names)))]
            others = [m for i, m in enumerate(means) if layout.names[i] != truth]
            assert means[layout.names.index(truth)] > max(others) + 0.1, (r.id, truth, means)


def test_styles_differ():
    stats = {}
    for m in ("MRI", "CT", "X-ray"):
        imgs = np.stack([_grey(r) for r in make_synthetic_split(m, "train", 30, seed=2, question_types=["count"])])
        stats[m] = (imgs.mean(), (imgs < 0.05).mean(), imgs.std(axis=(1, 2)).mean())
    # X-ray: bright, almost no black; MRI and CT: dark air around the section.
    assert stats["X-ray"][0] > stats["MRI"][0] + 0.1 and stats["X-ray"][0] > stats["CT"][0] + 0.1, stats
    assert stats["X-ray"][1] < 0.05 < min(stats["MRI"][1], stats["CT"][1]), stats
    # CT's grain: neighbouring pixels differ far more than in MRI's soft texture (the median ignores edges).
    grain = {m: np.median(np.abs(np.diff(_grey(make_synthetic_split(m, "train", 1, seed=2)[0])[16:40, 16:40])))
             for m in ("MRI", "CT")}
    assert grain["CT"] > 0.02 > 2 * grain["MRI"], grain


def test_train_and_test_disjoint():
    train = make_synthetic_split("MRI", "train", 200, seed=42)
    test = make_synthetic_split("MRI", "test", 200, seed=42)
    assert not {r.image for r in train} & {r.image for r in test}
    assert not {r.id for r in train} & {r.id for r in test}
    assert len({r.image for r in train}) == 200


def test_synthetic_dataset_from_config():
    cfg = DataConfig(train_modalities=["MRI", "CT"], num_train=25, num_eval_per_modality=7, image_size=84,
                     question_types=["location", "count"])
    train, evals = synthetic_dataset(cfg)
    assert len(train) == 25 and Counter(r.modality for r in train) == {"MRI": 13, "CT": 12}
    assert sorted(evals) == ["CT", "MRI", "X-ray"] and all(len(v) == 7 for v in evals.values())
    assert all(r.modality == m for m, recs in evals.items() for r in recs)
    assert train[0].load_image().size == (84, 84)
    default_train, _ = synthetic_dataset(DataConfig(num_eval_per_modality=1))
    assert len(default_train) == 600


@pytest.mark.parametrize("kwargs,needle", [
    ({"modality": "PET"}, "PET"), ({"split": "val"}, "val"), ({"num_options": 11}, "num_options"),
    ({"image_size": 50}, "image_size"), ({"question_types": ["size"]}, "question_types"),
])
def test_bad_arguments_name_the_problem(kwargs, needle):
    args = dict(modality="MRI", split="train", n=2, seed=0) | kwargs
    with pytest.raises(ValueError, match=needle):
        make_synthetic_split(**args)
