"""The one record type of the task: an image, a multiple-choice question and its answer letter."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Union

from PIL import Image

from protocol.choices import LETTERS

MODALITIES = ("MRI", "CT", "X-ray")

# An image is either already in memory (synthetic scans, rows of a Hugging Face data set)
# or a path that is opened only when a prompt is built, so large data sets stay cheap.
ImageSource = Union[str, Image.Image, bytes]


class RecordError(ValueError):
    """A record that cannot be used; the message names the record and, where there is one, its file."""


@dataclasses.dataclass(frozen=True)
class MedVQARecord:
    id: str  # unique within its data set; used in every error message and output row
    image: ImageSource  # a path (opened lazily), PNG/JPEG bytes, or a PIL image
    question: str  # the question text without the options
    options: dict  # letter -> option text, in display order ("A", "B", ...)
    answer: str  # the correct letter, a key of `options`
    modality: str = "MRI"  # "MRI", "CT", "X-ray" or any label of the source data
    source: str = "synthetic"  # the data set or file the record came from

    def __post_init__(self):
        if not self.options:
            raise RecordError(f"record {self.id!r} ({self.source}): has no options")
        bad = [k for k in self.options if k not in LETTERS]
        if bad:
            raise RecordError(f"record {self.id!r} ({self.source}): option keys {bad} are not letters A-J")
        if self.answer not in self.options:
            raise RecordError(
                f"record {self.id!r} ({self.source}): answer {self.answer!r} is not among its options "
                f"{sorted(self.options)}"
            )

    def load_image(self) -> Image.Image:
        """The image as RGB; a missing or unreadable file raises RecordError naming record and file."""
        src = self.image
        try:
            if isinstance(src, Image.Image):
                return src.convert("RGB")
            if isinstance(src, (bytes, bytearray)):
                with Image.open(io.BytesIO(src)) as im:
                    return im.convert("RGB")
            with Image.open(Path(src)) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            where = f" file {src}" if isinstance(src, (str, Path)) else ""
            raise RecordError(f"record {self.id!r} ({self.source}):{where} image cannot be read: {exc}") from exc

    def option_lines(self) -> str:
        return "\n".join(f"{k}) {v}" for k, v in self.options.items())
