"""The learner alone on one GPU at the paper's sizes: step time, tokens/s, peak memory, log-prob agreement
with transformers, and whether loss and gradient norm stay finite.

No Ray and no vLLM: the project's own `LearnerRank` (a plain class) runs DeepSpeed ZeRO-3 on one rank with
gradient checkpointing, a KL reference and bf16, exactly as configs/medvlm_r1_2b.yaml sets it, and trains
GRPO steps on one rank's share of the paper's step: 4 prompts x G = 4 samples, about 512 prompt tokens
each (an image and the question), 512 completion tokens, micro-batches of 4. The model has Qwen2-VL-2B's
real shape (2.2 B parameters) with random weights, written to a temporary folder first: nothing is
downloaded. The tokenizer is the tiny model's, trained on the spot; token ids stay below its vocabulary
while the embedding keeps 2B's 151936 rows.

    python bench/gpu_learner.py                      # 2B shape, bf16, on the GPU
    python bench/gpu_learner.py --size tiny --device cpu --prompt-tokens 64 --completion-tokens 16
                                                     # the code path on CPU in fp32 (tests run this)

bench/README.md gives the exact command for the lent GPU machine (wheels to carry, install line).
Prints one block of results, and with --json PATH writes them as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Qwen2-VL-2B-Instruct's config.json, less its token ids (taken from the tokenizer used here).
QWEN2_VL_2B_TEXT = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                        rms_norm_eps=1e-6, use_sliding_window=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]})
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, in_channels=3,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("2b", "tiny"), default="2b", help="model shape (tiny: the test model's)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--prompts", type=int, default=4, help="prompts on this rank (paper: 16 per step over 4 ranks)")
    p.add_argument("--group-size", type=int, default=4, help="G samples per prompt")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length to reach, image tokens included")
    p.add_argument("--completion-tokens", type=int, default=512)
    p.add_argument("--image-size", type=int, default=448, help="image side in pixels (448: 256 image tokens)")
    p.add_argument("--steps", type=int, default=2, help="timed GRPO steps, after one untimed warm-up step")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def model_config(size: str, tokenizer):
    from transformers import Qwen2VLConfig

    from medvqa.tiny_model import QWEN2_VL_SPECIAL_TOKENS, tiny_config

    if size == "tiny":
        return tiny_config(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    text = dict(QWEN2_VL_2B_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], dtype="bfloat16")
    return Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_2B_VISION, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)


def write_checkpoint(out: Path, size: str, device: str) -> tuple[str, int]:
    """A random checkpoint of the chosen shape (initialised on `device`, saved on disk) and its parameter count."""
    from transformers import Qwen2VLForConditionalGeneration

    from medvqa.tiny_model import tiny_processor, train_tokenizer

    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(model_config(size, tokenizer))
    model = model.to(torch.bfloat16 if size == "2b" else torch.float32)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    tiny_processor(tokenizer).save_pretrained(out)
    del model
    return str(out), count


def learner_config(model_path: str, args):
    """configs/medvlm_r1_2b.yaml on one rank: its ZeRO-3, checkpointing, KL and micro-batch as they are."""
    from launcher.config import load_config

    gpu = args.device == "cuda"
    return load_config(str(REPO / "configs" / "medvlm_r1_2b.yaml"), [
        f"model.path={model_path}", "learner.num_ranks=1", "rollout.num_workers=1",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group_size}",
        f"rollout.max_new_tokens={args.completion_tokens}", f"cluster.device={'gpu' if gpu else 'cpu'}",
        f"learner.precision={'bf16' if gpu else 'fp32'}", "logging.wandb=false"])


def prompt_records(processor, args) -> tuple[list, list[list[int]]]:
    """`args.prompts` synthetic scans whose questions are padded until the prompt holds
    `args.prompt_tokens` tokens (image tokens included), with the ids the engine would have seen."""
    from medvqa.prompt import render_prompt
    from medvqa.synthetic import make_synthetic_split

    records = make_synthetic_split("MRI", "train", args.prompts, seed=0, image_size=args.image_size)
    out, ids = [], []
    for rec in records:
        words = 0
        while True:
            padded = dataclasses.replace(rec, question=rec.question + " lesion" * words)
            enc = processor(text=[render_prompt(padded, processor)], images=[padded.load_image()], return_tensors="pt")
            if enc["input_ids"].shape[1] >= args.prompt_tokens:
                break
            words += max(1, (args.prompt_tokens - enc["input_ids"].shape[1]) // 2)
        out.append(padded)
        ids.append(enc["input_ids"][0].tolist())
    return out, ids


def rollout_shard(records, prompt_ids, bpe_vocab: int, args):
    """A RolloutBatch of random completions (ordinary tokens only: ids below the first special token);
    rewards alternate so that every group has advantages."""
    from protocol.batch import RolloutBatch

    g, n = args.group_size, len(records) * args.group_size
    gen = torch.Generator().manual_seed(1)
    completions = [torch.randint(0, bpe_vocab, (args.completion_tokens,), generator=gen).tolist() for _ in range(n)]
    rewards = [float(i % 2) for i in range(n)]
    return RolloutBatch(record_ids=[r.id for r in records], group_size=g, prompt_token_ids=prompt_ids,
                        completion_token_ids=completions, completion_texts=[""] * n,
                        sampling_logprobs=[[0.0] * args.completion_tokens for _ in range(n)],
                        rewards={"accuracy": rewards}, total_rewards=rewards, finish_reasons=["length"] * n,
                        weight_version=0)


def transformers_logprobs(model_path: str, processor, record, completion: list[int], device: str) -> list[float]:
    """The same completion scored by transformers' own forward pass (the image through pixel_values)."""
    from transformers import Qwen2VLForConditionalGeneration

    from medvqa.prompt import render_prompt

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype).to(device).eval()
    enc = processor(text=[render_prompt(record, processor)], images=[record.load_image()], return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.tensor([completion])], dim=1)
    types = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(completion), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                       mm_token_type_ids=types.to(device), pixel_values=enc["pixel_values"].to(device, dtype),
                       image_grid_thw=enc["image_grid_thw"].to(device)).logits[0]
    k = len(completion)
    logp = torch.log_softmax(logits[-k - 1:-1].float(), dim=-1)
    out = logp.gather(-1, torch.tensor(completion, device=device)[:, None])[:, 0].tolist()
    del model
    return out


def agreement(rank, model_path: str, processor, records, batch, device: str) -> dict:
    """Learner (DeepSpeed engine, ZeRO-3) vs transformers on the first sample, before any step."""
    learner = rank.completion_logprobs(records[0], batch.prompt_token_ids[0], batch.completion_token_ids[0])
    reference = transformers_logprobs(model_path, processor, records[0], batch.completion_token_ids[0], device)
    diffs = [abs(a - b) for a, b in zip(learner, reference)]
    return {"logprob_diff/max_abs": max(diffs), "logprob_diff/mean_abs": sum(diffs) / len(diffs),
            "logprob/mean": sum(reference) / len(reference), "logprob_tokens": len(diffs)}


def timed_steps(rank, batch, records, args) -> dict:
    """One untimed warm-up step, then `args.steps` timed ones; memory peaks over the timed steps."""
    cuda = args.device == "cuda"
    rank.train_on(batch, records)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, metrics = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        metrics.append(rank.train_on(batch, records))
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    step_s = sum(seconds) / len(seconds)
    tokens = sum(len(p) for p in batch.prompt_token_ids) * batch.group_size + batch.num_samples * args.completion_tokens
    out = {"step_s": step_s, "tokens_per_s": tokens / step_s,
           "completion_tokens_per_s": batch.num_samples * args.completion_tokens / step_s,
           "loss": [m["loss"] for m in metrics], "grad_norm": [m["grad_norm"] for m in metrics]}
    out["finite"] = all(math.isfinite(x) for x in out["loss"] + out["grad_norm"])
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    from learner.actor import LearnerRank
    from medvqa.prompt import load_processor

    with tempfile.TemporaryDirectory(prefix="bench-gpu-learner-") as tmp:
        t0 = time.perf_counter()
        model_path, params = write_checkpoint(Path(tmp) / "model", args.size, args.device)
        cfg = learner_config(model_path, args)
        processor = load_processor(model_path, cfg.model.min_pixels, cfg.model.max_pixels)
        records, prompt_ids = prompt_records(processor, args)
        batch = rollout_shard(records, prompt_ids, processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"), args)
        t1 = time.perf_counter()
        rank = LearnerRank(cfg, model_path, 0, 1, "127.0.0.1", _free_port())
        t2 = time.perf_counter()
        result = {"size": args.size, "device": args.device, "precision": cfg.learner.precision,
                  "parameters": params, "zero_stage": cfg.learner.zero_stage,
                  "gradient_checkpointing": cfg.learner.gradient_checkpointing,
                  "micro_batch_size": cfg.learner.micro_batch_size, "samples": batch.num_samples,
                  "prompt_tokens": [len(p) for p in prompt_ids], "completion_tokens": args.completion_tokens,
                  "build_s": t1 - t0, "learner_init_s": t2 - t1}
        result.update(agreement(rank, model_path, processor, records, batch, args.device))
        result.update(timed_steps(rank, batch, records, args))
    return result


def report(result: dict) -> str:
    lines = [f"learner on {result['device']}: Qwen2-VL {result['size']} shape, {result['parameters'] / 1e9:.3f} B "
             f"parameters, {result['precision']}, ZeRO-{result['zero_stage']}, gradient checkpointing "
             f"{result['gradient_checkpointing']}, {result['samples']} samples (micro-batch "
             f"{result['micro_batch_size']}), prompts {min(result['prompt_tokens'])}-{max(result['prompt_tokens'])} "
             f"tokens, completions {result['completion_tokens']} tokens",
             f"  step time            {result['step_s']:.3f} s (mean of the timed steps)",
             f"  tokens/s             {result['tokens_per_s']:.0f} trained (prompt + completion), "
             f"{result['completion_tokens_per_s']:.0f} completion",
             f"  log-prob vs HF       max |diff| {result['logprob_diff/max_abs']:.2e}, mean |diff| "
             f"{result['logprob_diff/mean_abs']:.2e} over {result['logprob_tokens']} tokens",
             f"  loss, grad norm      {result['loss']}, {result['grad_norm']} (finite: {result['finite']})"]
    if "peak_allocated_gib" in result:
        lines.append(f"  peak GPU memory      {result['peak_allocated_gib']:.1f} GiB allocated, "
                     f"{result['peak_reserved_gib']:.1f} GiB reserved")
    lines.append(f"  set-up               {result['build_s']:.1f} s checkpoint, {result['learner_init_s']:.1f} s learner")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_learner.py: no GPU visible; use --device cpu --size tiny for the CPU smoke run",
              file=sys.stderr)
        return 2
    result = run(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
