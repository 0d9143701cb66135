"""The architecture table: a family tvlib does not know is refused by name; a Llama-like
family needs one row."""

import pytest
import torch

from tvlib import architectures
from tvlib.architectures import ARCHITECTURES, LLAMA_LIKE, architecture
from tvlib.models import blocks, final_norm_scale, n_layers
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import zero_shot_prompts
from tvlib.scoring import score


def test_every_family_of_the_presets_has_a_row(toy_lm):
    from tvlib.standins import ARCHITECTURES as PRESET_FAMILIES, model_config
    assert architecture(toy_lm) is LLAMA_LIKE
    assert n_layers(toy_lm) == toy_lm._module.config.num_hidden_layers
    for family in sorted(set(PRESET_FAMILIES.values())):
        config = model_config(family, vocab_size=100, n_layers=2, d_model=16, bos_id=1,
                              eos_id=2, pad_id=0)
        assert config.model_type in ARCHITECTURES, family


def test_a_llama_like_family_needs_one_row(toy_lm, monkeypatch):
    batch = tokenize_prompts(toy_lm.tokenizer, zero_shot_prompts([("hot", "cold"), ("up", "down")],
                                                                 task="antonyms"))
    before = score(toy_lm, batch).nll
    scale = final_norm_scale(toy_lm)[0]
    monkeypatch.setattr(toy_lm._module.config, "model_type", "llama-like")
    with pytest.raises(ValueError, match=r"does not know model family 'llama-like'.*"
                                         r"ARCHITECTURES\[model_type\] = LLAMA_LIKE"):
        blocks(toy_lm)
    monkeypatch.setitem(architectures.ARCHITECTURES, "llama-like", LLAMA_LIKE)
    assert torch.equal(score(toy_lm, batch).nll, before)
    assert torch.equal(final_norm_scale(toy_lm)[0], scale)
