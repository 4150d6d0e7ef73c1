"""Procedural anatomy for the synthetic scans, one look per modality, as float images in [0, ANATOMY_MAX].

The styles differ in layout, contrast and texture (MRI: grey head on black with soft texture;
CT: round section with a bright bone ring and grainy noise; X-ray: bright chest with dark lungs),
so a model trained on one meets the others out of distribution, as the paper's MRI -> CT/X-ray test.
Nothing here reaches ANATOMY_MAX's ceiling of 0.8, which keeps lesions (1.0) separable by a threshold.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ANATOMY_MAX = 0.8


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel centres scaled to [-1, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return (yy + 0.5) / size * 2 - 1, (xx + 0.5) / size * 2 - 1


def smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Gaussian-blurred white noise with unit standard deviation: soft tissue texture."""
    noise = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    kernel = np.exp(-2 * (np.pi * sigma_px) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    out = np.real(np.fft.ifft2(np.fft.fft2(noise) * kernel))
    return out / (out.std() + 1e-8)


def ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipse."""
    return np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)


def mri(rng: np.random.Generator, size: int) -> np.ndarray:
    """Axial brain MRI: grey head on black, a dark skull rim, brighter cortex ring, dark ventricles."""
    y, x = grid(size)
    cy, cx = rng.uniform(-0.04, 0.04, size=2)
    head = ellipse(y, x, cy, cx, rng.uniform(0.84, 0.9), rng.uniform(0.72, 0.8))
    img = np.where(head < 1.0, 0.42 + 0.06 * smooth_noise(rng, size, size / 14), 0.0)
    img = np.where((head > 0.86) & (head < 0.94), 0.12, img)  # skull: dark on T2-like MRI
    img = np.where((head > 0.72) & (head <= 0.86), img + 0.12, img)  # cortex
    for side in (-1, 1):
        vent = ellipse(y, x, cy - 0.05, cx + side * 0.14, 0.28, 0.08)
        img = np.where(vent < 1.0, 0.15, img)
    return img


def ct(rng: np.random.Generator, size: int) -> np.ndarray:
    """Axial CT: a round section on black air, a bright bone ring, grainy quantum noise."""
    y, x = grid(size)
    cy, cx = rng.uniform(-0.04, 0.04, size=2)
    r = ellipse(y, x, cy, cx, rng.uniform(0.84, 0.9), rng.uniform(0.86, 0.92))
    img = np.where(r < 1.0, 0.27, 0.02)
    ring = (r > 0.62) & (r < 0.74)
    img = np.where(ring, 0.7, img)
    img = np.where(r <= 0.62, 0.33, img)
    grain = rng.normal(0.0, 0.04, (size, size))
    return img + np.where(r < 1.0, grain, 0.25 * grain)


def xray(rng: np.random.Generator, size: int) -> np.ndarray:
    """Frontal chest X-ray: bright soft tissue and spine, dark lungs with faint ribs, a vertical gradient."""
    y, x = grid(size)
    img = 0.5 + 0.1 * (y + 1) / 2 + 0.03 * smooth_noise(rng, size, size / 10)
    shift = rng.uniform(-0.04, 0.04)
    ribs = 0.05 * (np.sin((y + shift) * np.pi * 5) > 0.6)
    for side in (-1, 1):
        lung = ellipse(y, x, -0.05 + shift, side * 0.42, 0.62, 0.3)
        img = np.where(lung < 1.0, 0.18 + ribs + 0.03 * (lung**2), img)
    img = np.where(np.abs(x - shift) < 0.09, 0.72, img)  # spine
    heart = ellipse(y, x, 0.3, 0.12, 0.25, 0.22)
    return np.where(heart < 1.0, 0.6, img)


STYLES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {"MRI": mri, "CT": ct, "X-ray": xray}


def draw_anatomy(modality: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The modality's background anatomy, clipped to [0, ANATOMY_MAX]."""
    try:
        style = STYLES[modality]
    except KeyError:
        raise ValueError(f"unknown synthetic modality {modality!r}; choose one of {sorted(STYLES)}") from None
    return np.clip(style(rng, size), 0.0, ANATOMY_MAX)
