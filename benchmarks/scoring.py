"""Time scoring steered prompts with tvlib against the same scoring in plain PyTorch.

Both score each task's 50 zero-shot prompts with its task vector added at the
separator of resid_pre ``layer``, in batches of 32, and return the same NLLs. tvlib
(nnsight) applies the final norm and unembedding only at the positions that predict
the answers; the plain version registers a forward pre-hook on block ``layer`` and
takes the logits the Hugging Face model returns (every position).

    python benchmarks/scoring.py [--layer 4] [--preset toy]
"""

import argparse
import json
import time

import torch
from common import add_at, parse_args

from tvlib.experiments import PromptConfig, build_task_prompts, model_tasks
from tvlib.models import load_model
from tvlib.interventions import Steering
from tvlib.scoring import answer_nll, score
from tvlib.taskvec import task_vectors

TASKS = ["antonyms", "en_es", "country_capital", "present_simple_past_simple"]


@torch.no_grad()
def plain_pytorch_score(lm, batch, layer: int, vector: torch.Tensor, batch_size: int):
    """The reference: a pre-hook adds the vector; logits at every position."""
    model = lm._module
    out = []
    for start in range(0, len(batch), batch_size):
        part = batch.select(torch.arange(start, min(start + batch_size, len(batch))))
        rows = torch.arange(len(part))

        handle = add_at(model.model.layers[layer], rows, part.steer_pos, lambda: vector)
        try:
            logits = model(**part.model_inputs()).logits                    # (B, T, V)
        finally:
            handle.remove()
        predict = (part.target_pos - 1).clamp(min=0)
        out.append(answer_nll(logits[rows.unsqueeze(-1), predict], part.targets))
    return torch.cat(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", type=int, default=4)
    args = parse_args(parser)
    lm = load_model(args.preset, device="cpu")
    prompts = {name: build_task_prompts(lm.tokenizer, task, PromptConfig())
               for name, task in model_tasks(lm, TASKS).items()}
    vectors = {name: task_vectors(lm, p.few_shot, [args.layer])[0] for name, p in prompts.items()}
    timings = {"tvlib (nnsight, logits at scored positions)": [], "plain PyTorch hook": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = torch.cat([score(lm, p.zero_shot, Steering(args.layer, vectors[name]), 32).nll
                          for name, p in prompts.items()])
        timings["tvlib (nnsight, logits at scored positions)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        plain = torch.cat([plain_pytorch_score(lm, p.zero_shot, args.layer, vectors[name], 32)
                           for name, p in prompts.items()])
        timings["plain PyTorch hook"].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in timings.items()}
    print(json.dumps({"prompts": len(ours), "layer": args.layer, "best_seconds": best,
                      "ratio_tvlib_over_plain": best["tvlib (nnsight, logits at scored positions)"]
                      / best["plain PyTorch hook"],
                      "max_abs_difference": float((ours - plain).abs().max())}, indent=2))


if __name__ == "__main__":
    main()
