"""The accuracy rule exactly as the MedVLM-R1 authors' training code scores it, registered as `accuracy_paper`.

Their rule reads the first `<answer>(.*?)</answer>` (tags in any case, the block may span lines),
strips and upper-cases it, and finds every letter A-J in it:
* exactly one such letter, the right one, and nothing else: 1.0 (`B`, `b`, ` B `);
* exactly one such letter, the right one, with other characters: 0.5 (`B)`, `(B)`, `B.`, `B: 3`);
* anything else: 0.0 (no block, an empty block, a wrong letter, two letters even if both are the right
  one, `B) Brain` whose text holds B, B, A and I, `Option B` whose text holds I and B).
It reads letters inside words too, so `Yes` names E and `No` names none; and it ignores the format
(text around the tags does not matter). Those are its published quirks, kept so that a run with this
reward reproduces the paper's; `accuracy` (rewards.rules) is the stricter default.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence, Union

from protocol.choices import LETTERS
from rewards.registry import register_reward

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_LETTER = re.compile(f"[{LETTERS}]")  # A-J, as the authors' code


@register_reward("accuracy_paper")
def accuracy_paper_reward(completion: str, answer: Optional[str],
                          options: Union[Mapping[str, str], Sequence[str], None] = None) -> float:
    """1.0, 0.5 or 0.0 by the published rule above; `options` is not consulted (the rule never was)."""
    if not isinstance(completion, str) or not isinstance(answer, str):
        return 0.0
    truth = re.sub(r"\s+", "", answer.upper())
    block = _ANSWER_BLOCK.search(completion)
    given = block.group(1).strip() if block else ""
    letters = _LETTER.findall(given.upper())
    if len(letters) != 1 or letters[0] != truth:
        return 0.0
    rest = re.sub(letters[0], "", given, count=1, flags=re.IGNORECASE)
    return 0.5 if rest.strip() else 1.0
