"""Reward functions registered by name and combined with the weights of the config.

Every reward function has one call signature, `fn(completion, answer, options) -> float`, so
that the config can name any mix of them (`rewards.weights: {format: 1.0, accuracy: 1.0}`)
and the rollout workers score a completion without knowing which rewards exist.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

RewardFn = Callable[[str, Optional[str], Optional[Mapping[str, str]]], float]

REWARD_FUNCTIONS: dict[str, RewardFn] = {}


class UnknownRewardError(KeyError, ValueError):
    """A reward name that is not registered; the message names it and lists the registered ones."""

    def __init__(self, name: str):
        self.name = name
        known = ", ".join(sorted(REWARD_FUNCTIONS)) or "none"
        super().__init__(f"unknown reward {name!r}; registered rewards: {known}")

    def __str__(self) -> str:
        # KeyError's own __str__ shows the repr of its argument, quotes and all.
        return self.args[0]


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to the config as `name`.

    A second, different function under a name already taken is an error, so that two
    modules cannot silently shadow each other's reward.
    """

    def decorator(fn: RewardFn) -> RewardFn:
        taken = REWARD_FUNCTIONS.get(name)
        same = taken is not None and (taken.__module__, taken.__qualname__) == (fn.__module__, fn.__qualname__)
        if taken is not None and not same:  # the same function again (a module re-import) is fine
            raise ValueError(f"reward {name!r} is already registered to {taken.__module__}.{taken.__qualname__}")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The registered function called `name`; UnknownRewardError otherwise."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise UnknownRewardError(name) from None


def check_weights(weights: Mapping[str, float]) -> None:
    """Fail early (at start-up, not at the first rollout) on a weight for an unregistered reward."""
    for name in weights:
        get_reward(name)


def score(
    completion: str,
    answer: Optional[str],
    options: Optional[Mapping[str, str]],
    weights: Mapping[str, float],
) -> tuple[dict[str, float], float]:
    """Each named reward (unweighted, for logging) and their weighted sum.

    A reward with weight 0 is still computed, so that it can be watched without training on it.
    """
    check_weights(weights)
    components = {name: float(get_reward(name)(completion, answer, options)) for name in weights}
    total = sum(float(weights[name]) * value for name, value in components.items())
    return components, total
