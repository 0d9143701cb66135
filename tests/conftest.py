"""Shared fixtures: tokenizers built locally and the shipped embedded model."""

import os

import pytest
import torch

# The tests compare against CPU references: models and SAEs loaded without a device go to
# the CPU even on a GPU machine (tvlib.models.default_device); the CUDA tests ask for it.
os.environ["TVLIB_DEVICE"] = "cpu"

from tvlib.paths import TOY_DIR


@pytest.fixture(scope="session")
def word_tokenizer():
    """The embedded model's tokenizer (word level, BOS prepended)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOY_DIR / "model")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small byte-level BPE tokenizer (GPT-2 style: spaces merge into tokens, no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["Follow the pattern:\nhot -> cold\nbig -> small\n", "Q:cat\nA:dog\n\n",
              "beautiful -> ugly"] * 50
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", padding_side="left")


@pytest.fixture(scope="session")
def toy_lm():
    from tvlib.models import load_model
    torch.manual_seed(0)
    return load_model("toy", device="cpu")
