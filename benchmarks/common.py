"""What the benchmarks share: their common options, and the plain-PyTorch side (a forward
pre-hook that edits a block's input)."""

import argparse

import torch


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add --repeats and --preset, parse, and run on 2 threads (the reported machine)."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="toy", help="e.g. gemma-3-270m-offline")
    args = parser.parse_args()
    torch.set_num_threads(2)
    return args


def add_at(block, rows: torch.Tensor, positions: torch.Tensor, vector):
    """Register a pre-hook on ``block`` adding ``vector()`` at (rows, positions) of its
    input hidden states (passed by position or as ``hidden_states=``); returns the handle."""
    def hook(module, args, kwargs):
        if args:
            h = args[0].clone()
            h[rows, positions] += vector()
            return (h, *args[1:]), kwargs
        h = kwargs["hidden_states"].clone()
        h[rows, positions] += vector()
        return args, {**kwargs, "hidden_states": h}

    return block.register_forward_pre_hook(hook, with_kwargs=True)
