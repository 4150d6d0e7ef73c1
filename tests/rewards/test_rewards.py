"""Rule rewards: adversarial completions for the format and accuracy rewards, and the registry."""
import pytest

from rewards import (
    REWARD_FUNCTIONS,
    UnknownRewardError,
    accuracy_paper_reward,
    accuracy_reward,
    check_weights,
    extract_answer,
    format_reward,
    register_reward,
    score,
)

OPTIONS = {"A": "Glioma", "B": "Left hemisphere", "C": "Right hemisphere", "D": "A lesion"}
ANSWER = "B"


def wrap(answer: str, think: str = "The bright region lies on the left.") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


FORMAT_CASES = [
    # (completion, expected format reward)
    (wrap("B"), 1.0),
    ("<think>x</think>\n<answer>B</answer>", 1.0),
    ("  \n<think>\nstep 1\nstep 2\n</think>\n\n<answer> B </answer>\n ", 1.0),
    ("<think></think><answer>B</answer>", 1.0),  # empty think is allowed, as in the paper's pattern
    ("<think>x</think><answer></answer>", 0.0),  # empty answer
    ("<think>x</think><answer>  \n </answer>", 0.0),  # whitespace-only answer
    ("<answer>B</answer>", 0.0),  # no think
    ("<think>x</think>", 0.0),  # no answer
    ("<answer>B</answer><think>x</think>", 0.0),  # wrong order
    ("Sure! <think>x</think><answer>B</answer>", 0.0),  # text before
    ("<think>x</think> so <answer>B</answer>", 0.0),  # text between
    ("<think>x</think><answer>B</answer> Hope this helps", 0.0),  # text after
    ("<think>x</think><answer>B</answer>.", 0.0),
    ("<think>a<think>b</think>c</think><answer>B</answer>", 0.0),  # nested think
    ("<think>x <answer>A</answer></think><answer>B</answer>", 0.0),  # answer inside think
    ("<think>x</think><answer><answer>B</answer></answer>", 0.0),  # nested answer
    ("<think>x</think><answer>B</answer><answer>C</answer>", 0.0),  # two answer blocks
    ("<think>x</think><think>y</think><answer>B</answer>", 0.0),  # two think blocks
    ("<think>x</think><answer>B", 0.0),  # unclosed answer
    ("<think>x<answer>B</answer>", 0.0),  # unclosed think
    ("<think>x</think><answer>B</think></answer>", 0.0),  # stray close inside answer
    ("<Think>x</Think><Answer>B</Answer>", 0.0),  # wrong case is a malformed tag
    ("<think >x</think><answer>B</answer>", 0.0),  # spaced tag
    ("<think>x</ think><answer>B</answer>", 0.0),
    ("<think>x</think><answer id=1>B</answer>", 0.0),  # attributes
    ("<think/><answer>B</answer>", 0.0),
    ("<think>x</think><answer>B</answer></answer>", 0.0),  # extra close
    ("<think>x<thinking>y</thinking></think><answer>B</answer>", 1.0),  # <thinking> is text, not a tag
    ("<think>La lésion est à gauche — 左侧 🧠</think><answer>B</answer>", 1.0),  # unicode
    ("\u3000<think>x</think>\u00a0<answer>B</answer>\u2003", 1.0),  # unicode whitespace
    ("\u200b<think>x</think><answer>B</answer>", 0.0),  # zero-width space is not whitespace
    ("＜think＞x＜/think＞<answer>B</answer>", 0.0),  # full-width brackets are text before <answer>
    ("", 0.0),
    ("B", 0.0),
    ("<think>x</think>answer: B", 0.0),
]


@pytest.mark.parametrize("completion,expected", FORMAT_CASES)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected
    assert format_reward(completion, ANSWER, OPTIONS) == expected


ACCURACY_CASES = [
    # (answer block or whole completion, expected letter); bare strings are wrapped in think/answer
    ("B", "B"),
    ("(B)", "B"),
    ("B)", "B"),
    ("B.", "B"),
    ("B:", "B"),
    ("[B]", "B"),
    (" \n B \n", "B"),
    ("b", "B"),  # lower case: the letter alone, as the paper's upper-casing would accept
    ("(b)", "B"),
    ("Left hemisphere", "B"),  # the option's exact text
    ("left   HEMISPHERE", "B"),  # case- and whitespace-insensitive
    ("\nLeft\themisphere\n", "B"),
    ("B) Left hemisphere", "B"),  # letter plus its own text
    ("B. left hemisphere", "B"),
    ("(B) Left hemisphere", "B"),
    ("B - Left hemisphere", "B"),
    ("B Left hemisphere", "B"),
    ("b) left hemisphere", "B"),
    ("C", "C"),  # a wrong but valid choice is still extracted
    ("Right hemisphere", "C"),
    ("A lesion", "D"),  # option D's text, not the letter A in front of other text
    ("A lesion on the left", None),
    ("B) Right hemisphere", None),  # letter and text disagree: names two options
    ("B) the left one", None),  # letter with text that is no option
    ("B because it is brighter", None),
    ("ABCD", None),  # several letters
    ("A B C D", None),
    ("A, B", None),
    ("A or B", None),
    ("B and C", None),
    ("BB", None),
    ("E", None),  # not among the options
    ("Z", None),
    ("left", None),  # a substring of an option's text is not its text
    ("hemisphere", None),
    ("Left hemisphere.", None),  # exact text only
    ("The answer is B", None),
    ("Answer: B", None),
    ("a mass", None),  # lower-case article, never the letter A
    ("", None),
    ("   ", None),
    ("Ｂ", None),  # full-width letter is not a letter of the options
]


@pytest.mark.parametrize("block,expected", ACCURACY_CASES)
def test_extract_answer_from_block(block, expected):
    completion = wrap(block)
    assert extract_answer(completion, OPTIONS) == expected
    assert accuracy_reward(completion, ANSWER, OPTIONS) == (1.0 if expected == ANSWER else 0.0)


STRUCTURE_CASES = [
    # (completion, expected letter): the tags must single out one answer block
    ("<answer>B</answer>", "B"),  # no think: format is the format reward's business
    ("I think <answer>B</answer> is right", "B"),  # text outside: likewise
    ("The answer is B.", None),  # answer outside tags
    ("<think>B</think>", None),
    ("<think>x</think><answer>B</answer><answer>B</answer>", None),  # two answer blocks, even agreeing
    ("<think>x</think><answer>B</answer><answer>C</answer>", None),
    ("<think>x</think><answer>B", None),  # unclosed answer
    ("<think>x</think>B</answer>", None),  # close without open
    ("<think>x<answer>B</answer>", None),  # unclosed think around the answer
    ("<think>x <answer>B</answer> y</think>", None),  # answer inside think
    ("<think>x</think><answer><answer>B</answer></answer>", None),  # nested answer
    ("<think>x</think><answer>B<think>y</think></answer>", None),  # think inside answer
    ("<think>a<think>b</think></think><answer>B</answer>", None),  # nested think
    ("<think>x</think><Answer>B</Answer>", None),  # malformed tags
    ("<think>x</think><answer>B</answer ><answer>C</answer>", None),
    ("<think>It is A, B, C or D.</think><answer>B</answer>", "B"),  # letters in think do not count
    ("<think>x</think><answer>B</answer> but maybe C", "B"),
    ("<think>x</think><answer></answer>", None),  # empty answer is never rewarded
    ("<think>x</think><answer>\n</answer>", None),
    ("<think>Le côté gauche 左 🧠</think><answer>B</answer>", "B"),
    ("", None),
]


@pytest.mark.parametrize("completion,expected", STRUCTURE_CASES)
def test_extract_answer_structure(completion, expected):
    assert extract_answer(completion, OPTIONS) == expected
    assert accuracy_reward(completion, ANSWER, OPTIONS) == (1.0 if expected == ANSWER else 0.0)


def test_empty_answer_block_earns_nothing_for_any_answer():
    for letter in "ABCD":
        assert accuracy_reward(wrap(""), letter, OPTIONS) == 0.0


def test_answer_letter_not_found_by_substring():
    # The right answer is A, and "A lesion" starts with an A, but the block names option D.
    assert accuracy_reward(wrap("A lesion"), "A", OPTIONS) == 0.0
    assert accuracy_reward(wrap("A lesion"), "D", OPTIONS) == 1.0


def test_options_as_list_and_without_options():
    listed = ["Glioma", "Left hemisphere", "Right hemisphere"]
    assert extract_answer(wrap("Right hemisphere"), listed) == "C"
    assert extract_answer(wrap("D"), listed) is None  # only A-C exist
    assert extract_answer(wrap("D"), None) == "D"  # without options any letter A-J alone
    assert extract_answer(wrap("K"), None) is None
    assert extract_answer(wrap("Left hemisphere"), None) is None


def test_ambiguous_duplicate_option_texts_give_none():
    assert extract_answer(wrap("Same"), {"A": "same", "B": "Same"}) is None


def test_answer_argument_is_normalised_and_bad_answers_score_zero():
    assert accuracy_reward(wrap("B"), " b ", OPTIONS) == 1.0
    assert accuracy_reward(wrap("B"), "", OPTIONS) == 0.0
    assert accuracy_reward(wrap("B"), None, OPTIONS) == 0.0


@pytest.mark.parametrize("bad", [None, 3, b"<answer>B</answer>", ["B"]])
def test_non_strings_score_zero_without_raising(bad):
    assert format_reward(bad) == 0.0
    assert accuracy_reward(bad, "B", OPTIONS) == 0.0
    assert extract_answer(bad, OPTIONS) is None


def test_long_think_text_is_scored_correctly():
    think = ("The lesion is bright; compare < and > and </ thinking. " * 200)[:10_000]
    assert len(think) == 10_000
    good = wrap("B", think=think)
    assert format_reward(good) == 1.0 and accuracy_reward(good, "B", OPTIONS) == 1.0
    unclosed = f"<think>{think}<answer>B</answer>"
    assert format_reward(unclosed) == 0.0 and accuracy_reward(unclosed, "B", OPTIONS) == 0.0


@pytest.mark.parametrize(
    "completion,expected_format,expected_accuracy",
    [
        ("<" + " " * 10_000, 0.0, 0.0),
        ("<" * 10_000, 0.0, 0.0),
        ("<" + "/" * 10_000 + "think", 0.0, 0.0),
        ("<think" * 2_000, 0.0, 0.0),
        ("<think " + "x" * 10_000, 0.0, 0.0),
        ("<think>" + "<answer " * 1_500 + "</think>", 0.0, 0.0),
        (wrap("B" + " " * 10_000 + "x"), 1.0, 0.0),  # letter then text that is no option
        (wrap("(" + " " * 10_000 + "B"), 1.0, 1.0),
        (wrap("B", think="<" * 10_000), 1.0, 1.0),
    ],
)
def test_long_pathological_inputs(completion, expected_format, expected_accuracy):
    # Long runs of the characters the patterns branch on; a pattern with nested or adjacent
    # overlapping quantifiers would backtrack quadratically or worse here and stall the run.
    assert format_reward(completion) == expected_format
    assert accuracy_reward(completion, "B", OPTIONS) == expected_accuracy


def test_registry_holds_the_builtin_rewards():
    assert REWARD_FUNCTIONS["format"] is format_reward
    assert REWARD_FUNCTIONS["accuracy"] is accuracy_reward
    assert REWARD_FUNCTIONS["accuracy_paper"] is accuracy_paper_reward


def test_score_returns_components_and_weighted_total():
    components, total = score(wrap("B"), "B", OPTIONS, {"format": 1.0, "accuracy": 1.0})
    assert components == {"format": 1.0, "accuracy": 1.0} and total == 2.0
    # right letter, broken format: 0.5 * 0 + 2 * 1 = 2
    components, total = score("<answer>B</answer>", "B", OPTIONS, {"format": 0.5, "accuracy": 2.0})
    assert components == {"format": 0.0, "accuracy": 1.0} and total == 2.0
    # good format, wrong letter: 0.5 * 1 + 2 * 0 = 0.5
    components, total = score(wrap("C"), "B", OPTIONS, {"format": 0.5, "accuracy": 2.0})
    assert components == {"format": 1.0, "accuracy": 0.0} and total == 0.5
    # a zero weight still reports its component
    components, total = score(wrap("B"), "B", OPTIONS, {"format": 0.0, "accuracy": 1.0})
    assert components == {"format": 1.0, "accuracy": 1.0} and total == 1.0


def test_unknown_reward_name_is_an_error_listing_known_names():
    with pytest.raises(UnknownRewardError) as info:
        score(wrap("B"), "B", OPTIONS, {"format": 1.0, "acuracy": 1.0})
    message = str(info.value)
    assert "'acuracy'" in message and "accuracy" in message and "format" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyError):
        check_weights({"length": 1.0})


def test_register_custom_reward_and_refuse_a_clashing_name():
    @register_reward("test_length_penalty")
    def length_penalty(completion, answer=None, options=None):
        return -len(completion) / 100

    try:
        components, total = score("x" * 50, "B", OPTIONS, {"test_length_penalty": 2.0, "format": 1.0})
        assert components == {"test_length_penalty": -0.5, "format": 0.0} and total == -1.0
        with pytest.raises(ValueError, match="already registered"):
            register_reward("format")(length_penalty)
        assert REWARD_FUNCTIONS["format"] is format_reward
    finally:
        REWARD_FUNCTIONS.pop("test_length_penalty")


# ---------------------------------------------------------------- the paper's accuracy rule

PAPER_CASES = [
    # (completion, answer letter, reward by the authors' rule)
    (wrap("B"), "B", 1.0),  # exactly the right letter alone
    (wrap(" b "), "B", 1.0),  # upper-cased and stripped before the letters are counted
    ("<answer>\nB\n</answer>", "B", 1.0),  # the block may span lines
    ("<ANSWER>B</Answer>", "B", 1.0),  # tags in any case
    ("Sure. <answer>B</answer> Hope this helps", "B", 1.0),  # the format is the format reward's business
    (wrap("B"), " b ", 1.0),  # the solution letter is upper-cased and its spaces removed
    (wrap("B)"), "B", 0.5),  # the right letter with other characters
    (wrap("(B)"), "B", 0.5),
    (wrap("B."), "B", 0.5),
    (wrap("B: 3"), "B", 0.5),
    (wrap("Yes"), "E", 0.5),  # letters are read inside words: "YES" holds one letter of A-J, E
    (wrap("No"), "E", 0.0),  # "NO" holds none
    (wrap("C"), "B", 0.0),  # wrong letter
    (wrap("B) Left hemisphere"), "B", 0.0),  # "LEFT HEMISPHERE" holds E, F, H, ...: several letters
    (wrap("Option B"), "B", 0.0),  # I and B
    (wrap("B B"), "B", 0.0),  # the right letter twice
    (wrap("A, B"), "B", 0.0),  # two letters
    (wrap(""), "B", 0.0),  # empty block
    (wrap("  "), "B", 0.0),
    (wrap("42"), "B", 0.0),  # no letter
    ("<think>B</think>", "B", 0.0),  # no answer block
    ("<answer>C</answer><answer>B</answer>", "B", 0.0),  # only the first block counts
    ("<answer>B</answer><answer>C</answer>", "B", 1.0),
]


@pytest.mark.parametrize("completion,answer,expected", PAPER_CASES)
def test_accuracy_paper_follows_the_published_rule(completion, answer, expected):
    assert accuracy_paper_reward(completion, answer, OPTIONS) == expected
    assert REWARD_FUNCTIONS["accuracy_paper"](completion, answer, None) == expected  # options play no part


def test_accuracy_paper_differs_from_the_default_where_the_paper_gives_half():
    # The default counts "(B)" and "B) text" as naming B in full; the paper halves the first and zeroes the second.
    assert [accuracy_reward(wrap(a), "B", OPTIONS) for a in ("(B)", "B) Left hemisphere")] == [1.0, 1.0]
    assert [accuracy_paper_reward(wrap(a), "B", OPTIONS) for a in ("(B)", "B) Left hemisphere")] == [0.5, 0.0]
    assert accuracy_paper_reward(None, "B") == 0.0 and accuracy_paper_reward(wrap("B"), None) == 0.0


def test_paper_weights_train_on_the_paper_rule_and_watch_the_default():
    weights = {"format": 1.0, "accuracy_paper": 1.0, "accuracy": 0.0}  # configs/medvlm_r1_2b.yaml
    components, total = score(wrap("(B)"), "B", OPTIONS, weights)
    assert components == {"format": 1.0, "accuracy_paper": 0.5, "accuracy": 1.0} and total == 1.5
