"""Seeded subsets and image-disjoint train/test splits of a record list."""
from __future__ import annotations

import hashlib
import logging
import os
import random
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from medvqa.record import MedVQARecord

log = logging.getLogger(__name__)


def datasets_shuffle_order(n: int, seed: int) -> list:
    """The order in which Hugging Face `datasets`' `Dataset.shuffle(seed=seed)` puts n rows: it draws
    `numpy.random.default_rng(seed).permutation(n)`. Computed here so that loading needs no `datasets`."""
    return np.random.default_rng(seed).permutation(n).tolist()


def seeded_subset(records: Sequence[MedVQARecord], n: Optional[int], seed: int = 42) -> list:
    """The first `n` records after `datasets`' seeded shuffle, i.e. the rows of
    `Dataset.shuffle(seed=seed).select(range(n))` on the same records in the same order (the paper's loader
    shuffles its MRI subset with `datasets`, seed 42). None or n >= len gives all of them, shuffled.
    """
    if n is not None and n < 1:
        raise ValueError(f"seeded_subset: n must be at least 1, got {n}")
    shuffled = [records[i] for i in datasets_shuffle_order(len(records), seed)]
    if n is not None and n > len(shuffled):
        log.warning("asked for %d records, only %d are available; using all", n, len(shuffled))
    return shuffled[:n]


def image_identity(record: MedVQARecord) -> str:
    """A key equal for records that show the same image: the resolved path, or a hash of the bytes/pixels."""
    img = record.image
    if isinstance(img, Image.Image):
        return "pixels:" + hashlib.sha1(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()
    if isinstance(img, (bytes, bytearray)):
        return "bytes:" + hashlib.sha1(img).hexdigest()
    return "path:" + os.path.realpath(img)


def split_by_image(records: Sequence[MedVQARecord], test_fraction: float, seed: int = 42) -> tuple:
    """(train, test) with every image on one side only, so no test image is ever trained on.

    A seeded shuffle of the distinct images puts round(test_fraction * images) of them in test; each side
    keeps the input order.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"split_by_image: test_fraction must be in [0, 1], got {test_fraction}")
    keys = [image_identity(r) for r in records]
    distinct = list(dict.fromkeys(keys))
    random.Random(seed).shuffle(distinct)
    test_keys = set(distinct[:round(test_fraction * len(distinct))])
    train = [r for r, k in zip(records, keys) if k not in test_keys]
    test = [r for r, k in zip(records, keys) if k in test_keys]
    return train, test
