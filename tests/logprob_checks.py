"""Log-probs of one fixed completion, as the tests that compare the learner, the engines and transformers
take them."""
import torch

FIXED_COMPLETION = "<think>the bright spot is on one side</think><answer>A</answer>"
SYNC_ATOL = 1e-4  # learner vs vLLM log-probs of the same weights (float32, other kernels)


def fixed_logprobs(actors, record, prompt_ids, completion) -> tuple[list[float], list[list[float]]]:
    """(learner's, each worker's) log-probs of a fixed completion; every ZeRO-3 rank takes part."""
    learner = actors.learners.call("completion_logprobs", record, prompt_ids, completion, doing="scoring")[0]
    workers = actors.workers.call("completion_logprobs", record, completion, doing="scoring")
    return learner, workers


def hf_completion_logprobs(model, processor, record, completion: list[int]) -> list[float]:
    """transformers' float32 log-probs of `completion` after the record's prompt and image."""
    from medvqa.prompt import render_prompt

    enc = processor(text=[render_prompt(record, processor)], images=[record.load_image()], return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.tensor([completion])], dim=1)
    types = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(completion), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits[0].float()
    k = len(completion)
    logp = torch.log_softmax(logits[-k - 1:-1], dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()
