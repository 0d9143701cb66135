"""``python -m tvlib.toy train`` retrains the embedded model and its SAEs;
``python -m tvlib.toy card`` measures them and writes the model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..paths import TOY_DIR
from . import __doc__ as PACKAGE_DOC
from .card import write_model_card
from .data import ToyConfig
from .training import train_all


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tvlib.toy", description=PACKAGE_DOC)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="retrain the embedded model and its SAEs")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, default=TOY_DIR)
    train.add_argument("--train-tokens", type=int, default=ToyConfig.train_tokens)
    train.add_argument("--sae-train-tokens", type=int, default=ToyConfig.sae_train_tokens)
    train.add_argument("--saes-only", action="store_true",
                       help="keep the trained model, retrain only the SAEs")
    card = sub.add_parser("card", help="measure the shipped model and write its model card")
    card.add_argument("--out", type=Path, default=TOY_DIR)
    args = parser.parse_args(argv)
    if args.command == "train":
        cfg = ToyConfig(seed=args.seed, train_tokens=args.train_tokens,
                        sae_train_tokens=args.sae_train_tokens)
        train_all(cfg, args.out, skip_model=args.saes_only)
    else:
        write_model_card(args.out)




if __name__ == "__main__":
    main()
