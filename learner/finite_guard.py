"""No update from a non-finite loss, gradient or learning rate: the step stops before the optimiser runs.

Gradients are watched with tensor hooks, which see each parameter's gradient as backward produces it,
before DeepSpeed reduces, partitions or clips it; so the check is the same under every ZeRO stage,
and a NaN never reaches the weights (nor, later, a saved policy).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch


class NonFiniteStepError(FloatingPointError):
    """A step whose loss, gradients or learning rate are not finite; raised before the update."""


class GradientWatch:
    """Per micro-batch, the L2 norm of every gradient backward gives to the module's trainable
    parameters. A context manager: the hooks live for one optimiser step."""

    def __init__(self, module: torch.nn.Module):
        self.names: list[str] = []
        self._params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._norms: list[tuple[int, torch.Tensor]] = []
        self._handles: list = []

    def __enter__(self) -> "GradientWatch":
        for i, (name, p) in enumerate(self._params):
            self.names.append(name)
            self._handles.append(p.register_hook(self._recorder(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _recorder(self, index: int) -> Callable[[torch.Tensor], None]:
        def record(grad: torch.Tensor) -> None:
            # A reduction stays on the device; nothing synchronises until the step's check.
            self._norms.append((index, torch.linalg.vector_norm(grad.detach())))
        return record

    def squared_sum(self) -> tuple[float, Optional[str]]:
        """(sum of the squared gradient norms seen, the first parameter with a non-finite gradient)."""
        if not self._norms:
            return 0.0, None
        norms = torch.stack([n.double() for _, n in self._norms])
        total = float(norms.square().sum())
        if math.isfinite(total):
            return total, None
        first = int(torch.nonzero(~torch.isfinite(norms))[0])
        return total, self.names[self._norms[first][0]]


def check_step(loss: float, grad_sq: float, lr: float, bad_param: Optional[str], step: int) -> None:
    """Raise NonFiniteStepError naming the values when any of them is not finite. `loss` and `grad_sq`
    are already summed over the learner ranks, so every rank decides the same."""
    if math.isfinite(loss) and math.isfinite(grad_sq) and math.isfinite(lr):
        return
    # A finite sum is no exact norm (squares of per-micro-batch, per-rank norms); only its finiteness counts.
    grad = "finite" if math.isfinite(grad_sq) else f"{grad_sq}"
    first = f" (first non-finite gradient: {bad_param})" if bad_param else ""
    raise NonFiniteStepError(f"optimiser step {step}: non-finite values, loss={loss:g}, grad_norm={grad}{first}, "
                             f"lr={lr:g}; the update was not applied")
