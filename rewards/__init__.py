"""Rule rewards (format, accuracy, and the paper's own accuracy rule `accuracy_paper`) and the registry
that combines them with config weights.

Importing the package registers the built-in rewards, so `score` and `REWARD_FUNCTIONS`
always know them.
"""
from rewards.registry import (
    REWARD_FUNCTIONS,
    RewardFn,
    UnknownRewardError,
    check_weights,
    get_reward,
    register_reward,
    score,
)
from rewards.paper_rules import accuracy_paper_reward
from rewards.rules import accuracy_reward, extract_answer, format_reward

__all__ = [
    "REWARD_FUNCTIONS",
    "RewardFn",
    "UnknownRewardError",
    "accuracy_paper_reward",
    "accuracy_reward",
    "check_weights",
    "extract_answer",
    "format_reward",
    "get_reward",
    "register_reward",
    "score",
]
