"""LoRA (`model.lora_rank` > 0): peft adapters on the text decoder's projections, everything else frozen.

Only the adapters train and only they are in the optimiser. What leaves the learner is still a plain
Qwen2-VL: the rollout engines and `final/` get merged weights, W + (alpha / r) * B @ A, under the base
model's own parameter names, so vLLM needs no LoRA support. An update carries the merged weight of every
wrapped module, plus the rest of each engine layer it touches (see `ENGINE_FUSED`): vLLM reloads a layer
from the tensors that arrive, and a fused layer reloaded from part of its tensors would get the rest
uninitialised.

The KL reference is the policy itself with its adapters switched off (`AdapterlessReference`): the frozen
base is exactly the starting policy, and no second copy of the model is held.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from learner import zero_params

ADAPTER = "default"  # peft's name of the one adapter
ADAPTER_DIR = "adapter"  # beside the merged model in a saved policy folder
# In-memory prefix of the text decoder's blocks (transformers 5's Qwen2-VL layout); the vision tower lives
# under model.visual (its projections are qkv, proj, fc1, fc2: never matched, as they are outside this prefix).
DECODER_BLOCKS = "model.language_model.layers."
# Checkpoint modules that vLLM loads into one layer (Qwen2's packed_modules_mapping: qkv_proj, gate_up_proj).
ENGINE_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def merged_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, computed in float32 and returned in W's dtype (A: r x in, B: out x r)."""
    delta = lora_b.detach().float() @ lora_a.detach().float()
    return (base.detach().float() + scaling * delta).to(base.dtype)


def target_modules(hf_model: nn.Module, targets: Iterable[str]) -> list[str]:
    """In-memory names of the text decoder's linear layers whose own name is one of `targets`.

    A target that names no such layer is an error naming the config key and the names there are."""
    found = {n: m for n, m in hf_model.named_modules() if n.startswith(DECODER_BLOCKS) and isinstance(m, nn.Linear)}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in found})
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise ValueError(f"config key 'model.lora_targets': {', '.join(map(repr, missing))} names no linear layer "
                         f"of the language model's blocks (they are: {', '.join(leaves)})")
    return [n for n in found if n.rsplit(".", 1)[-1] in set(targets)]


def apply_lora(hf_model: nn.Module, rank: int, alpha: float, dropout: float, targets: Iterable[str]):
    """Wrap the target modules in place with fresh adapters (B = 0: the policy starts as the base) and
    freeze every other parameter. Returns the peft model, a handle for saving and switching adapters off."""
    from peft import LoraConfig, get_peft_model

    targets = list(targets)
    target_modules(hf_model, targets)  # checked here, where the model's names are known
    leaves = "|".join(re.escape(t) for t in targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=rf"{re.escape(DECODER_BLOCKS)}\d+\.(?:.*\.)?(?:{leaves})")
    return get_peft_model(hf_model, config)


def wrapped_modules(hf_model: nn.Module) -> dict[str, nn.Module]:
    """Module name (as in the unwrapped model) -> its LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in hf_model.named_modules() if isinstance(m, LoraLayer)}


def _original_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@dataclasses.dataclass(frozen=True)
class SyncTensor:
    """One tensor of a weight update: a base parameter, merged with its adapter when it has one."""
    name: str  # the checkpoint name (what vLLM's loader reads)
    base: nn.Parameter
    lora_a: Optional[nn.Parameter] = None
    lora_b: Optional[nn.Parameter] = None
    scaling: float = 0.0

    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.base, self.lora_a, self.lora_b) if p is not None]

    def value(self) -> torch.Tensor:
        """Valid inside a gather of `params()`."""
        if self.lora_a is None:
            return self.base.data
        return merged_weight(self.base.data, self.lora_a.data, self.lora_b.data, self.scaling)


def _sent_modules(wrapped: Iterable[str], hf_model: nn.Module) -> set[str]:
    names = {n for n, _ in hf_model.named_modules()}
    out = set()
    for module in wrapped:
        parent, leaf = module.rsplit(".", 1)
        group = next((g for g in ENGINE_FUSED if leaf in g), (leaf,))
        out |= {f"{parent}.{m}" for m in group if f"{parent}.{m}" in names}
    return out


def sync_tensors(hf_model: nn.Module, checkpoint_names: dict[str, str]) -> list[SyncTensor]:
    """What a weight update carries under LoRA, in the model's parameter order: every parameter of the
    modules that adapters wrap (and of their fused siblings), the wrapped weights merged, plus any other
    parameter that trains. `checkpoint_names` maps the unwrapped model's names (taken before `apply_lora`)."""
    wrapped = wrapped_modules(hf_model)
    sent = _sent_modules(wrapped, hf_model)
    out = []
    for name, param in hf_model.named_parameters():
        if _is_adapter(name):
            continue  # folded into its base weight
        original = _original_name(name)
        module, leaf = original.rsplit(".", 1)
        layer = wrapped.get(module)
        if layer is not None and leaf == "weight":
            out.append(SyncTensor(checkpoint_names[original], param, layer.lora_A[ADAPTER].weight,
                                  layer.lora_B[ADAPTER].weight, float(layer.scaling[ADAPTER])))
        elif module in sent or param.requires_grad:
            out.append(SyncTensor(checkpoint_names[original], param))
    return out


def iter_sync(items: list[SyncTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, whole tensor) per item, gathered one at a time under ZeRO-3 (all ranks iterate)."""
    for item in items:
        with zero_params.gathered(item.params()):
            yield item.name, item.value()


def merged_state_dict(hf_model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict with merged weights, on CPU at rank 0 (empty elsewhere);
    every rank must call it."""
    wrapped = wrapped_modules(hf_model)
    state = zero_params.full_state_dict(hf_model, rank)
    out = {}
    for key, value in state.items():
        if _is_adapter(key):
            continue
        original = _original_name(key)
        module, leaf = original.rsplit(".", 1)
        if module in wrapped and leaf == "weight":
            scaling = float(wrapped[module].scaling[ADAPTER])
            value = merged_weight(value, state[f"{module}.lora_A.{ADAPTER}.weight"],
                                  state[f"{module}.lora_B.{ADAPTER}.weight"], scaling)
        out[original] = value
    return out


def adapter_parameters(hf_model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in hf_model.named_parameters() if _is_adapter(n)]


class AdapterlessReference:
    """The KL reference under LoRA: the policy's engine with its adapters switched off, i.e. the frozen
    base, exactly the starting policy (B starts at zero and the base never trains)."""

    def __init__(self, engine, peft_model):
        self.engine, self.peft_model = engine, peft_model

    def __call__(self, **kwargs) -> torch.Tensor:
        with self.peft_model.disable_adapter():
            return self.engine(**kwargs)
