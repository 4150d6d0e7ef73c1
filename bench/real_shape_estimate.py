"""The estimate of bench/real_shape.py for the full depth (28 text layers, 32 vision blocks) from runs at cut
depths: a straight line per measured quantity, a vision block weighted against a text layer by what it costs."""
from __future__ import annotations

FULL_LAYERS, FULL_BLOCKS = 28, 32
TEXT_HIDDEN, VISION_EMBED = 1536, 1280  # Qwen2-VL-2B (medvqa/tiny_model.py)


def depth_parameters() -> dict:
    """Parameters of one text layer, one vision block, and the depth-independent rest (embedding and tied
    head, patch embedding, merger, final norm), counted on the meta device."""
    from medvqa.tiny_model import parameter_count, real_shape_config

    one = parameter_count(real_shape_config(layers=1, vision_depth=1))
    layer = parameter_count(real_shape_config(layers=2, vision_depth=1)) - one
    block = parameter_count(real_shape_config(layers=1, vision_depth=2)) - one
    return {"text_layer": layer, "vision_block": block, "rest": one - layer - block}


def block_to_layer_cost(res: dict, cfg) -> dict:
    """What one vision block costs relative to one text layer, per kind of quantity: parameters for memory
    and the weight sync; forward FLOPs (matrix products 2 x parameters x tokens, plus attention) for the
    learner (every micro-batch runs the vision tower on its prompt's image again) and for generation (the
    image once per prompt, the text over the prompt and G completions)."""
    p, r, lc = res["parameters"], cfg.rollout, cfg.learner
    t_p, t_c = res["prompt"]["prompt_tokens"]["mean"], sum(s["completion_mean"] for s in res["steps"]) / len(res["steps"])
    n = res["prompt"]["vision_patches"]
    vision = 2 * p["vision_block"] * n + 4 * n * n * VISION_EMBED
    t = t_p + t_c
    prompts = r.prompts_per_step // lc.num_ranks
    learner_text = prompts * r.group_size * (2 * p["text_layer"] * t + 2 * t * t * TEXT_HIDDEN)
    learner_vision = prompts * max(1.0, r.group_size / lc.micro_batch_size) * vision
    gen_text = (2 * p["text_layer"] * (t_p + r.group_size * t_c)
                + 2 * TEXT_HIDDEN * (t_p * t_p + r.group_size * (2 * t_p * t_c + t_c * t_c)))
    params = p["vision_block"] / p["text_layer"]
    return {"memory": params, "sync": params, "learner": learner_vision / learner_text, "generate": vision / gen_text}


def measured_quantities(res: dict) -> dict:
    """(value, cost kind) of each quantity the estimate scales."""
    roles, mem, means = res["memory"]["roles"], res["memory"], res["means"]
    learners = [v["peak_rss_gib"] for k, v in roles.items() if k.startswith("learner rank")]
    rollout = roles["rollout worker 0"]["peak_rss_gib"] + roles["vLLM engine of worker 0"]["peak_rss_gib"]
    return {"learner rank peak RSS GiB (largest)": (max(learners), "memory"),
            "rollout worker + engine peak RSS GiB": (rollout, "memory"),
            "process tree RSS peak GiB": (mem["tree_rss_peak_gib"], "memory"),
            "machine used above start GiB": (mem["machine_used_peak_gib"] - mem["machine_used_start_gib"], "memory"),
            "generate s": (means["generate_s"], "generate"), "learner s": (means["learner_s"], "learner"),
            "train phase s": (means["train_s"], "learner"), "sync s": (means["sync_s"], "sync")}


def extrapolate(res: dict, cfg, baseline: dict | None) -> dict:
    """Each quantity q at 28 text layers and 32 vision blocks: q + a_t (28 - L) + a_v (32 - V).

    With a baseline run at other depths (L', V'): a_t = (q - q') / ((L - L') + c (V - V')) and a_v = c a_t,
    c being what a vision block costs relative to a text layer (`block_to_layer_cost`): the measured
    difference, shared out by c. Without one: a_t = q P_t / P, a_v = q P_v / P (P_t, P_v the parameters of
    one layer and one block, P the model's): everything, fixed costs included, in proportion to the
    parameters, a crude figure. The step is the sum of its extrapolated phases and its measured rest.
    """
    p, L, V = res["parameters"], res["model"]["layers"], res["model"]["vision_depth"]
    costs = block_to_layer_cost(res, cfg)
    base_q = measured_quantities(baseline) if baseline else {}
    out = {}
    for name, (q, kind) in measured_quantities(res).items():
        if baseline:
            dl, dv = L - baseline["model"]["layers"], V - baseline["model"]["vision_depth"]
            if dl + costs[kind] * dv == 0:
                raise ValueError(f"the baseline has this run's depths ({L} layers, {V} blocks): nothing to fit")
            a_t = (q - base_q[name][0]) / (dl + costs[kind] * dv)
            a_v = costs[kind] * a_t
        else:
            a_t, a_v = q * p["text_layer"] / res["model"]["parameters"], q * p["vision_block"] / res["model"]["parameters"]
        out[name] = {"measured": q, "baseline": base_q[name][0] if baseline else None, "per_text_layer": a_t,
                     "per_vision_block": a_v, "full_depth": q + a_t * (FULL_LAYERS - L) + a_v * (FULL_BLOCKS - V)}
    rest = res["means"]["step_s"] - res["means"]["generate_s"] - res["means"]["train_s"] - res["means"]["sync_s"]
    full = sum(out[k]["full_depth"] for k in ("generate s", "train phase s", "sync s")) + rest
    out["step s"] = {"measured": res["means"]["step_s"], "full_depth": full}
    method = (f"two-point fit against {baseline['model']['layers']} layers / {baseline['model']['vision_depth']} "
              "blocks" if baseline else "proportional to parameter count (one run)")
    return {"method": method, "block_to_layer_cost": costs, "quantities": out}



def print_extrapolation(ext: dict) -> None:
    costs = "" if ext["method"].startswith("proportional") else "; a vision block costs " + ", ".join(
        f"{v:.2f} x a text layer in {k}" for k, v in ext["block_to_layer_cost"].items())
    print(f"ESTIMATE for {FULL_LAYERS} text layers / {FULL_BLOCKS} vision blocks with this run's settings "
          f"({ext['method']}{costs}):")
    for name, q in ext["quantities"].items():
        per = (f"per text layer {q['per_text_layer']:8.3f}, per vision block {q['per_vision_block']:8.3f}"
               if "per_text_layer" in q else " " * 52)
        print(f"  {name:38s} measured {q['measured']:8.2f}  {per}  -> {q['full_depth']:9.1f}")
