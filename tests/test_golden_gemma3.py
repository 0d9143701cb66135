"""Golden numbers of the real offline model: Gemma 3 270M from its PyPI GGUF package
(converted once into .cache/models), with the SAEs shipped in data/gemma-3-270m.

Re-pin only after checking that a change is intended: run ``python
tests/test_golden_gemma3.py`` and paste its output.
"""

from pathlib import Path

import pandas as pd
import pytest
import torch

from tvlib.experiments import PromptConfig, build_task_prompts, model_tasks, task_vector_sweep
from tvlib.features import corpus_texts, tokenize_corpus
from tvlib.models import load_model
from tvlib.saes import load_sae
from tvlib.sae_training import sae_quality
from tvlib.interventions import collect_residuals

PRESET = "gemma-3-270m-offline"
TASKS = ("country_capital", "antonyms")
LAYER = 12
PROMPTS = PromptConfig(n_prompts=8, n_eval=20, seed=0)
N_TEXTS = 16

# (task, method, layer): (accuracy, nll); layer -1 for the baselines. "TV": the mean
# residual at the last separator, written over the query's separator (Hendel et al.).
GOLDEN = {
    ('country_capital', 'zero-shot', -1): (0.05, 5.147),
    ('country_capital', 'ICL', -1): (0.875, 1.1262),
    ('country_capital', 'TV', 12): (0.8, 1.2451),
    ('antonyms', 'zero-shot', -1): (0.4, 3.3243),
    ('antonyms', 'ICL', -1): (0.625, 1.1244),
    ('antonyms', 'TV', 12): (0.8, 1.1934),
}
# The resid_pre 12 SAE on the first N_TEXTS corpus texts: (FVU, L0)
GOLDEN_SAE = (0.112, 69.15)


@pytest.fixture(scope="module")
def gemma():
    return load_model(PRESET, device="cpu")


def test_the_shipped_model_written_texts_are_this_models_and_intact():
    """The texts the default build reads instead of sampling: every chunk present, its
    file the one the record names, sampled from this model with the build's settings."""
    import warnings

    from tvlib.generated_text import _load_chunk, shipped_chunks
    from tvlib.models import model_source
    from tvlib.offline_saes import SHIPPED_TEXTS, BuildConfig, _generation
    from tvlib.presets import get_preset

    preset = get_preset(PRESET)
    folder = Path(preset.sae_dir).parent / SHIPPED_TEXTS
    generation = _generation(BuildConfig())
    model_dir = model_source(preset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # a mismatch warns: fail on it
        found = shipped_chunks(folder, model_dir, generation)
    assert sorted(found) == list(range(generation.n_chunks))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunk = _load_chunk(found[0], generation)
    assert (chunk["ids"][:, 0] == tokenizer.bos_token_id).all()
    special = torch.isin(chunk["ids"], torch.tensor(tokenizer.all_special_ids))
    ended = torch.cumsum(chunk["ids"] == tokenizer.eos_token_id, 1) > 0
    assert torch.equal(chunk["mask"], ~special & ~ended)


def measure_tasks(lm) -> dict:
    config = PromptConfig(**{**PROMPTS.__dict__, "n_shots": lm.preset.n_shots})
    rows = pd.concat([task_vector_sweep(lm, build_task_prompts(lm.tokenizer, task, config),
                                        [LAYER], positions="last", mode="replace")
                      for task in model_tasks(lm, TASKS).values()])
    return {(r.task, r.method, -1 if pd.isna(r.layer) else int(r.layer)):
            (round(r.accuracy, 4), round(r.nll, 4)) for r in rows.itertuples()}


def measure_sae(lm) -> tuple:
    tokens = tokenize_corpus(lm.tokenizer, corpus_texts(PRESET, N_TEXTS))
    ids, counted = tokens["inputs"]["input_ids"], tokens["counted"]         # BOS, padding out
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    resid = collect_residuals(lm, tokens["inputs"], [LAYER], positions)[0][counted]  # (n, d)
    quality = sae_quality(load_sae(PRESET, LAYER, device="cpu"), resid)
    return round(quality["fvu"], 4), round(quality["l0"], 2)


def test_icl_zero_shot_and_task_vector(gemma):
    got = measure_tasks(gemma)
    assert got.keys() == GOLDEN.keys()
    for key, (accuracy, nll) in GOLDEN.items():
        assert got[key][0] == pytest.approx(accuracy, abs=0.051), key   # one prompt in 20
        assert got[key][1] == pytest.approx(nll, abs=0.01), key


def test_sae_on_the_corpus(gemma):
    fvu, l0 = measure_sae(gemma)
    assert fvu == pytest.approx(GOLDEN_SAE[0], abs=2e-3)
    assert l0 == pytest.approx(GOLDEN_SAE[1], abs=0.5)


if __name__ == "__main__":
    lm = load_model(PRESET, device="cpu")
    print(measure_tasks(lm))
    print(measure_sae(lm))
