"""Time the batched (task x feature) steering grid against a loop over cells.

Both compute the same table: for each task's 50 zero-shot prompts and each of
the features, the loss with the feature's unit decoder direction (times scale)
added at the separator.

    python benchmarks/steering_grid.py [--features 16] [--layer 4] [--preset toy]
"""

import argparse
import json
import time

from common import parse_args

from tvlib.experiments import PromptConfig, build_task_prompts, model_tasks
from tvlib.models import load_model
from tvlib.saes import load_sae
from tvlib.steering import TASK_STEERING, steering_grid, steering_grid_loop

TASKS = ["antonyms", "en_es", "en_fr", "country_capital", "location_language",
         "present_simple_past_simple", "singular_plural", "person_profession"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--layer", type=int, default=4)
    args = parse_args(parser)
    lm = load_model(args.preset, device="cpu")
    sae = load_sae(args.preset, args.layer, device="cpu")
    batches = {name: build_task_prompts(lm.tokenizer, task, PromptConfig()).zero_shot
               for name, task in model_tasks(lm, TASKS).items()}
    features = list(range(0, sae.cfg.d_sae, sae.cfg.d_sae // args.features))[:args.features]
    timings = {"batched": [], "per-cell loop": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        batched = steering_grid(lm, batches, args.layer, sae, features, TASK_STEERING.scale)
        timings["batched"].append(time.perf_counter() - start)
        start = time.perf_counter()
        loop = steering_grid_loop(lm, batches, args.layer, sae, features, TASK_STEERING.scale)
        timings["per-cell loop"].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in timings.items()}
    print(json.dumps({"tasks": len(batches), "features": len(features),
                      "cells": len(batched), "best_seconds": best,
                      "speedup": best["per-cell loop"] / best["batched"],
                      "max_abs_difference": float((batched.loss - loop.loss).abs().max())},
                     indent=2))


if __name__ == "__main__":
    main()
