"""Rule rewards on the text of a completion: the format reward and the accuracy reward.

The policy is asked to answer as `<think>reasoning</think><answer>B</answer>`. Both rewards
read the completion through one tag scanner, so that they agree on what a tag is:

* Exactly `<think>`, `</think>`, `<answer>`, `</answer>` are tags. Anything that looks like one
  of them but is spelt otherwise (`<Answer>`, `< /think>`, `<answer id=1>`, `<think/>`) is a
  malformed tag and spoils both rewards: a policy must not earn reward from text a human
  reader would take for broken markup.
* Every pattern is linear in the length of the text (no nested quantifiers), so a
  completion of any length is scored in one pass.

Reward hacking seen in neighbouring systems shapes the accuracy rule: the answer block must
*be* an option (its letter, its text, or both), never merely *contain* one. An empty block,
a block naming several letters ("ABCD", "A or B"), and a block that only mentions the right
letter inside other text ("A lesion") all score 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from protocol.choices import LETTERS
from rewards.registry import register_reward

EXACT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# `<`, any slashes or spaces, a tag name as a whole word, anything up to the next `>` but never
# across another `<`. `[\s/]*` is one character class, so a failed match backs off in O(1) steps.
_TAG_RE = re.compile(r"<[\s/]*(?:think|answer)\b[^<>]*>", re.IGNORECASE)
# An optional opening bracket, one option letter, an optional separator. Lower case is
# accepted (the paper's trainer upper-cases the answer) because the letter must stand at the
# very start of the block and be followed by nothing, a separator, or whitespace; it is never
# searched for inside text, so the article "a" in "a lesion" cannot pass for option A.
_LETTER_RE = re.compile(r"[(\[]?\s*([A-Ja-j])\s*([)\].:\-]?)")

OptionsLike = Union[Mapping[str, str], Sequence[str], None]


@dataclass(frozen=True)
class _Tag:
    text: str  # the tag exactly as written
    start: int
    end: int


def _scan_tags(completion: str) -> list[_Tag]:
    return [_Tag(m.group(0), m.start(), m.end()) for m in _TAG_RE.finditer(completion)]


def _normalize(text: str) -> str:
    """Case- and whitespace-insensitive form used to compare an answer with an option's text."""
    return " ".join(text.split()).casefold()


def _option_texts(options: OptionsLike) -> dict[str, str]:
    """Letter -> normalised option text; a plain list of options is lettered A, B, C, ..."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        items = options.items()
    elif isinstance(options, (list, tuple)):
        items = zip(LETTERS, options)
    else:
        return {}
    return {str(k).strip().upper(): _normalize(str(v)) for k, v in items}


@register_reward("format")
def format_reward(completion: str, answer: Optional[str] = None, options: OptionsLike = None) -> float:
    """1.0 for `<think>...</think>` then `<answer>...</answer>` and nothing else, else 0.0.

    Only whitespace may stand before, between and after the two blocks; neither block may
    hold another tag; the answer block must hold more than whitespace. The think block may
    be empty, as in the paper's pattern `<think>.*?</think>\\s*<answer>.*?</answer>`.
    """
    if not isinstance(completion, str):
        return 0.0
    tags = _scan_tags(completion)
    if [t.text for t in tags] != list(EXACT_TAGS):
        return 0.0
    think_open, think_close, answer_open, answer_close = tags
    outside = (
        completion[: think_open.start],
        completion[think_close.end : answer_open.start],
        completion[answer_close.end :],
    )
    if any(part.strip() for part in outside):
        return 0.0
    return 1.0 if completion[answer_open.end : answer_close.start].strip() else 0.0


def _answer_block(completion: str) -> Optional[str]:
    """The text of the one answer block, or None when the tags do not single one out.

    None for: a malformed tag anywhere, no answer block or two, an unclosed or nested tag,
    any tag inside the answer block, and an answer block inside a think block. Text outside
    the tags is left to the format reward.
    """
    in_think, open_end, block = False, None, None
    for tag in _scan_tags(completion):
        if tag.text not in EXACT_TAGS or (open_end is not None and tag.text != "</answer>"):
            return None
        if tag.text == "<think>":
            if in_think:
                return None
            in_think = True
        elif tag.text == "</think>":
            if not in_think:
                return None
            in_think = False
        elif tag.text == "<answer>":
            if in_think or block is not None:
                return None
            open_end = tag.end
        else:  # "</answer>"
            if open_end is None:
                return None
            block, open_end = completion[open_end : tag.start], None
    if in_think or open_end is not None:
        return None
    return block


def _letters_named(content: str, texts: dict[str, str]) -> set[str]:
    """Every option letter the block's content can be read as naming (0, 1 or several)."""
    named = {letter for letter, text in texts.items() if text == _normalize(content)}
    m = _LETTER_RE.match(content)
    if m is None:
        return named
    letter, rest = m.group(1).upper(), content[m.end() :]
    if not rest.strip():  # the letter alone: "B", "(B)", "B)", "B.", "b"
        if not texts or letter in texts:
            named.add(letter)
        return named
    # A bare space separates only an upper-case letter: "a mass" is an article and a noun.
    separated = bool(m.group(2)) or (content[m.end(1)].isspace() and m.group(1).isupper())
    by_text = {k for k, text in texts.items() if text == _normalize(rest)}
    if separated and by_text:  # "B) left hemisphere": the letter and the text both count
        named |= by_text | {letter}
    return named


def extract_answer(completion: str, options: OptionsLike = None) -> Optional[str]:
    """The option letter (upper case) that the completion's single answer block names, else None.

    The block names an option when, stripped, it is that option's letter alone (`B`, `(B)`,
    `B)`, `B.`, `b`), that option's exact text (case- and whitespace-insensitive), or the
    letter, a separator (`)`, `.`, `:`, `-`, or a space after an upper-case letter) and the
    option's exact text. A block that
    can be read as naming two different options, or none, gives None. With no options
    given, any letter A-J alone is accepted.
    """
    if not isinstance(completion, str):
        return None
    block = _answer_block(completion)
    if block is None or not block.strip():
        return None
    named = _letters_named(block.strip(), _option_texts(options))
    return named.pop() if len(named) == 1 else None


@register_reward("accuracy")
def accuracy_reward(completion: str, answer: Optional[str], options: OptionsLike) -> float:
    """1.0 when the answer block names the option whose letter is `answer`, else 0.0."""
    if not isinstance(answer, str) or not answer.strip():
        return 0.0
    chosen = extract_answer(completion, options)
    return 1.0 if chosen is not None and chosen == answer.strip().upper() else 0.0
