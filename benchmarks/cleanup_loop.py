"""Time the cleanup loop (tvlib, nnsight) against the same loop in plain PyTorch hooks.

Both optimise the same SAE weights on the same model, prompts and layer for the
same number of steps (no early stopping). The plain version registers a
forward pre-hook on block L that adds the steering vector and runs the whole
model every step; tvlib computes once what the vector does not change (the blocks
before L, the tokens before the steer token) and unembeds only the scored tokens
(tvlib.steered_loss). tvlib's time includes that setup.

    python benchmarks/cleanup_loop.py [--steps 200] [--layer 3] [--preset toy]
"""

import argparse
import json
import time

import torch
from common import add_at, parse_args

from tvlib.cleanup import CleanupConfig, cleanup
from tvlib.feature_weights import activation_function, feature_units, initial_theta
from tvlib.experiments import PromptConfig, build_task_prompts, model_tasks
from tvlib.models import load_model
from tvlib.saes import load_sae
from tvlib.scoring import answer_nll
from tvlib.taskvec import task_vectors


def plain_pytorch_loop(lm, sae, layer, tv, train, cfg: CleanupConfig, steps: int):
    """The reference: hooks on the Hugging Face model, full forward each step."""
    model = lm._module
    act = activation_function(sae)
    theta0 = initial_theta(sae, tv)
    unit = feature_units(sae, tv).to(theta0.device)     # (F,) lr and L1 in norm-scaled units
    delta = torch.zeros_like(theta0, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=cfg.lr)
    rows = torch.arange(len(train))
    predict_pos = (train.target_pos - 1).clamp(min=0)
    steering = {}
    handle = add_at(model.model.layers[layer], rows, train.steer_pos, lambda: steering["v"])
    try:
        for _ in range(steps):
            w = act(theta0 + delta * unit)
            steering["v"] = sae.decode(w)
            logits = model(**train.model_inputs()).logits
            loss = answer_nll(logits[rows.unsqueeze(-1), predict_pos], train.targets).mean() + \
                cfg.lam * (w / unit).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--task", default="antonyms")
    args = parse_args(parser)
    lm = load_model(args.preset, device="cpu")
    sae = load_sae(args.preset, args.layer, device="cpu")
    task = model_tasks(lm, [args.task])[args.task]     # the pairs the model knows
    prompts = build_task_prompts(lm.tokenizer, task, PromptConfig())
    tv = task_vectors(lm, prompts.few_shot, [args.layer])[0]
    cfg = CleanupConfig(max_steps=args.steps, patience=args.steps + 1, progress=False)
    timings = {"tvlib (nnsight, shared work)": [], "plain PyTorch hooks": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        cleanup(lm, sae, args.layer, tv, prompts.train, cfg=cfg)
        timings["tvlib (nnsight, shared work)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        plain_pytorch_loop(lm, sae, args.layer, tv, prompts.train, cfg, args.steps)
        timings["plain PyTorch hooks"].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in timings.items()}
    report = {"steps": args.steps, "layer": args.layer, "batch": len(prompts.train),
              "best_seconds": best,
              "ms_per_step": {n: 1000 * t / args.steps for n, t in best.items()},
              "ratio_tvlib_over_plain": best["tvlib (nnsight, shared work)"] /
              best["plain PyTorch hooks"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
