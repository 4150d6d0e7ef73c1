"""Full parameters out of a (possibly ZeRO-3 partitioned) model: names, gathering, a fingerprint.

Under ZeRO-3 each rank holds a slice of every large parameter and `p.data` is an empty
placeholder outside a gather; every helper here is a collective then, and all ranks must call it
(and iterate it) together. Under ZeRO 0-2 the parameters are whole on every rank.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: list[torch.Tensor]):
    """A context in which the given parameters are whole on every rank (read-only)."""
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def checkpoint_names(hf_model: nn.Module) -> dict[str, str]:
    """In-memory parameter name -> the name `save_pretrained` writes (and vLLM's loader reads).

    transformers 5 renames some checkpoints' keys on load (Qwen2-VL: `model.language_model.*`
    in memory, `model.*` on disk; `model.visual.*` vs `visual.*`) and reverts that on save.
    """
    from transformers.core_model_loading import revert_weight_conversion

    names = [n for n, _ in hf_model.named_parameters()]
    out = {}
    for name in names:
        reverted = revert_weight_conversion(hf_model, {name: torch.empty(0)})
        if len(reverted) != 1:
            raise ValueError(f"parameter {name} does not map to a single checkpoint tensor: {list(reverted)}")
        out[name] = next(iter(reverted))
    return out


def full_named_parameters(hf_model: nn.Module, names: dict[str, str],
                          trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, whole tensor) per parameter (only those that train, if asked), gathered
    one at a time to bound memory.

    The yielded tensor is valid only until the next item is asked for (it is released after).
    """
    for name, param in hf_model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with gathered([param]):
            yield names[name], param.data


def weights_checksum(hf_model: nn.Module) -> float:
    """Sum of x + x^2 over every parameter entry, in float64: equal weights give equal numbers
    (up to summation order) whatever the ZeRO stage; any optimiser step moves it.

    Under ZeRO-3 each rank sums its own slices (the padding is zeros) and the sums are all-reduced.
    """
    params = list(hf_model.parameters())
    local = torch.zeros((), dtype=torch.float64)
    sliced = any(is_partitioned(p) for p in params)
    for p in params:
        x = (p.ds_tensor if sliced and is_partitioned(p) else p.data).detach().double()
        local += x.sum().cpu() + (x * x).sum().cpu()
    if sliced:
        import torch.distributed as dist

        device = params[0].ds_tensor.device
        total = local.to(device)
        dist.all_reduce(total)
        local = total.cpu()
    return float(local)


def full_state_dict(hf_model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU at rank 0 (empty elsewhere); every rank must call it.

    Names of one parameter (a tied embedding and output head) share one copy: `save_pretrained`
    recognises ties by shared storage and then writes the tensor once, as the published checkpoint has it.
    """
    params = list(hf_model.parameters())
    with gathered(params):
        if rank != 0:
            return {}
        copies: dict[int, torch.Tensor] = {}
        out = {}
        for name, value in hf_model.state_dict(keep_vars=True).items():
            if id(value) not in copies:
                copies[id(value)] = value.detach().cpu().clone()
            out[name] = copies[id(value)]
        return out
