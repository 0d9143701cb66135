"""Parameters are never quietly changed: a bad value is refused by an error that
names the parameter, the value and the fix. And SAEs are only used where they were
trained."""

import subprocess
import sys

import pytest
import torch

from tvlib.experiments import (PromptConfig, build_task_prompts, run_sae_view_sweep,
                               run_task_vector_sweep)
from tvlib.features import neuronpedia_url, read_features, tokenize_corpus
from tvlib.saes import load_sae
from tvlib.steering import feature_directions, steering_grid
from tvlib.interventions import Steering, collect_residuals
from tvlib.scoring import score
from tvlib.taskvec import task_vectors
from tvlib.tasks import load_task

TINY = PromptConfig(n_prompts=4, n_shots=4, n_eval=6, n_train=4)


@pytest.fixture(scope="module")
def prompts(toy_lm):
    return build_task_prompts(toy_lm.tokenizer, load_task("antonyms").head(100), TINY)


@pytest.mark.parametrize("field,value", [("n_shots", 0), ("n_prompts", 0), ("n_eval", -1),
                                         ("n_train", 0), ("n_first", 0), ("n_shots", 2.5),
                                         ("fmt", "chat"), ("seed", None)])
def test_prompt_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=f"{field}.*{value!r}"):
        PromptConfig(**{field: value})


def test_too_few_pairs_for_n_eval_is_refused_not_shrunk(toy_lm):
    task = load_task("antonyms").head(40)
    with pytest.raises(ValueError, match="n_eval=50.*lower n_eval"):
        build_task_prompts(toy_lm.tokenizer, task, PromptConfig(n_eval=50))


def test_negative_and_out_of_range_features_are_refused(toy_lm):
    sae = load_sae("toy", 4)
    for bad in ([-1], [1024], [1.0], [True]):
        with pytest.raises(ValueError, match=r"is not a feature of this SAE.*0\.\.1023"):
            feature_directions(sae, bad)
    with pytest.raises(ValueError, match="is not a feature"):
        neuronpedia_url(sae, -1)
    corpus = tokenize_corpus(toy_lm.tokenizer, ["the capital of france is paris"])
    with pytest.raises(ValueError, match="is not a feature"):
        read_features(toy_lm, sae, 4, corpus, features=[-1])
    with pytest.raises(ValueError, match="list of feature indices"):
        feature_directions(sae, 5)


def test_steering_vectors_are_checked(toy_lm, prompts):
    batch = prompts.zero_shot
    with pytest.raises(ValueError, match="NaN or inf"):
        Steering(4, torch.full((128,), float("nan")))
    with pytest.raises(ValueError, match="stack of 2 steering vectors for 6 prompts"):
        score(toy_lm, batch, Steering(4, torch.zeros(2, 128)))
    with pytest.raises(ValueError, match="width 64.*width 128"):
        score(toy_lm, batch, Steering(4, torch.zeros(64)))
    with pytest.raises(ValueError, match="shape"):
        Steering(4, torch.zeros(2, 3, 128))


def test_non_finite_scores_are_refused_not_returned(toy_lm, prompts):
    head = toy_lm._module.lm_head.weight
    saved = head[0].clone()
    try:
        with torch.no_grad():
            head[0] = float("nan")             # a model whose logits are NaN
        with pytest.raises(FloatingPointError, match="6 of 6 answer NLLs are NaN or inf"):
            score(toy_lm, prompts.zero_shot)
    finally:
        with torch.no_grad():
            head[0] = saved


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_batch_size_must_be_positive(toy_lm, prompts, bad):
    batch = prompts.few_shot
    for call in (lambda: score(toy_lm, batch, batch_size=bad),
                 lambda: collect_residuals(toy_lm, batch.model_inputs(), [2],
                                           batch.separator_pos, batch_size=bad),
                 lambda: task_vectors(toy_lm, batch, [2], batch_size=bad)):
        with pytest.raises(ValueError, match=f"batch_size={bad}: must be an int >= 1; pass e.g. batch_size=32"):
            call()


@pytest.mark.parametrize("layers,message", [([], "layers is empty"), (4, r"e\.g\. \[4\]"),
                                            ([2, 2], "repeats a layer"),
                                            ([9], "out of range"), (["2"], "must be an int")])
def test_bad_layers_are_refused(toy_lm, layers, message):
    with pytest.raises(ValueError, match=message):
        run_task_vector_sweep(toy_lm, ["antonyms"], layers, TINY)


def test_layers_without_an_sae_are_refused(tmp_path_factory):
    from tvlib.models import load_model
    from tvlib.standins import make_standin
    folder = tmp_path_factory.mktemp("gpt2")
    make_standin("gpt2", folder)          # SAEs at resid_pre 1..3
    lm = load_model(str(folder), device="cpu")
    with pytest.raises(ValueError, match=r"no SAE at resid_pre layers \[0\]"):
        run_sae_view_sweep(lm, ["antonyms"], [0], TINY)


def test_prompts_longer_than_the_context_are_refused(toy_lm, prompts, monkeypatch):
    width = prompts.few_shot.input_ids.shape[1]
    monkeypatch.setattr(toy_lm._module.config, "max_position_embeddings", width - 1)
    with pytest.raises(ValueError, match=f"inputs of {width} tokens are longer than the model's "
                                         f"context of {width - 1} tokens.*n_shots"):
        score(toy_lm, prompts.few_shot)


def test_steering_grid_and_reading_refuse_an_sae_of_another_layer(toy_lm, prompts):
    sae3 = load_sae("toy", 3)
    with pytest.raises(ValueError, match="reads resid_pre 3.*not resid_pre 4"):
        steering_grid(toy_lm, {"antonyms": prompts.zero_shot}, 4, sae3, [1], 20.0)
    corpus = tokenize_corpus(toy_lm.tokenizer, ["the capital of france is paris"])
    with pytest.raises(ValueError, match="reads resid_pre 3.*not resid_pre 4"):
        read_features(toy_lm, sae3, 4, corpus)
    with pytest.raises(ValueError, match="scale=nan: must be a finite number"):
        steering_grid(toy_lm, {"antonyms": prompts.zero_shot}, 3, sae3, [1], scale=float("nan"))


def test_importing_plotting_keeps_the_notebook_backend():
    """In Jupyter figures show inline: tvlib must not switch the process to Agg."""
    code = ("import matplotlib; before = matplotlib.get_backend(); import tvlib.plotting; "
            "print(before, matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"MPLBACKEND": "module://matplotlib_inline.backend_inline",
                              "PATH": ""}).stdout.split()
    assert out == ["module://matplotlib_inline.backend_inline"] * 2


# ---- found by probing the public API as a new user would

def test_a_batch_without_answers_is_not_scored_as_perfect(toy_lm):
    from tvlib.prompt_batch import tokenize_prompts
    from tvlib.prompts import get_format, render
    batch = tokenize_prompts(toy_lm.tokenizer, [render(get_format("authors"), [], "hot", "cold",
                                                       with_answer=False)])
    with pytest.raises(ValueError, match="1 of 1 prompts have no answer to score"):
        score(toy_lm, batch)


def test_steering_matrix_keys_and_labels_follow_features_by_task(toy_lm, tmp_path, monkeypatch):
    from tvlib.experiments import SteeringConfig, own_feature_wins, run_steering_matrix
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path)
    NO_RANDOM = SteeringConfig(random_seed=None)           # the features' columns only
    first = run_steering_matrix(toy_lm, ["antonyms", "en_es"], 4,
                                {"antonyms": [45, 322], "en_es": []}, TINY, NO_RANDOM)
    second = run_steering_matrix(toy_lm, ["antonyms", "en_es"], 4,
                                 {"antonyms": [45], "en_es": [322]}, TINY, NO_RANDOM)
    label = lambda grid, f: set(grid[grid.feature == f].feature_task)   # noqa: E731
    assert label(first, 322) == {"antonyms"} and label(second, 322) == {"en_es"}
    shared = run_steering_matrix(toy_lm, ["antonyms", "en_es"], 4,
                                 {"antonyms": [45], "en_es": [45]}, TINY, NO_RANDOM)
    assert label(shared, 45) == {"antonyms+en_es"}
    wins = own_feature_wins(shared)                # the one feature counts for both rows
    for task in ("antonyms", "en_es"):
        assert wins[task] == bool(shared[shared.task == task].relative_change.item() < 0)


def test_cleanup_report_refuses_repeated_rows(toy_lm):
    import pandas as pd
    from tvlib.experiments import cleanup_report
    rows = [{"task": "a", "layer": 4, "method": m, "vector": "TV", "view": view, "nll": 1.0,
             "l0": 3} for m, view in (("TV", "raw"), ("Recon of TV", "recon"),
                                       ("cleaned TV", "cleaned"))]
    with pytest.raises(ValueError, match="rows repeat a \\(task, layer, method\\)"):
        cleanup_report(pd.DataFrame(rows + rows))


def test_preset_json_never_reads_folders_from_the_working_directory(tmp_path, monkeypatch):
    import dataclasses
    from tvlib.presets import get_preset, preset_to_json, PRESETS
    (tmp_path / "elsewhere" / "saes").mkdir(parents=True)
    (tmp_path / "alone").mkdir()
    preset = dataclasses.replace(PRESETS["toy"], sae_dir="saes")
    preset_to_json(preset, tmp_path / "alone" / "preset.json")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="names sae_dir 'saes', which is not in"):
        get_preset(tmp_path / "alone")


def test_standins_never_overwrite_a_folder(tmp_path):
    from tvlib.standins import make_standin
    (tmp_path / "keep.txt").write_text("a researcher's notes")
    with pytest.raises(FileExistsError, match="is not empty"):
        make_standin("gpt2", tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "a researcher's notes"
    with pytest.raises(ValueError, match="n_layers >= 2"):
        make_standin("gpt2", tmp_path / "new", n_layers=1)


def test_more_bad_values_are_refused(toy_lm, prompts):
    from tvlib.cleanup import CleanupConfig, cleanup
    from tvlib.features import corpus_texts
    from tvlib.models import load_model
    from tvlib.pursuit import gradient_pursuit
    from tvlib.sae_views import recon_of_tv
    sae = load_sae("toy", 4)
    with pytest.raises(ValueError, match="n_texts=-1: must be an int >= 1"):
        corpus_texts("toy", n_texts=-1)
    with pytest.raises(ValueError, match=r"layer must be an int .*not True \(bool\)"):
        load_sae("toy", True)
    with pytest.raises(ValueError, match="dtype 'float33'"):
        load_model("toy", device="cpu", dtype="float33")
    with pytest.raises(ValueError, match="target_l0 must be an int"):
        gradient_pursuit(torch.randn(128), sae.W_dec, 5.0)
    with pytest.raises(ValueError, match="shape \\(64,\\).*width 128"):
        recon_of_tv(sae, torch.randn(64), 4)
    with pytest.raises(ValueError, match="CleanupConfig.lam=True"):
        CleanupConfig(lam=True)
    tv = torch.randn(128)
    with pytest.raises(ValueError, match="pursuit_l0=5000 is more than this SAE's 1024"):
        cleanup(toy_lm, sae, 4, tv, prompts.train, cfg=CleanupConfig(init="pursuit",
                                                                     pursuit_l0=5000))
    with pytest.raises(ValueError, match="non-empty set of token ids"):
        score(toy_lm, prompts.zero_shot, keep_logits=True).filtered_accuracy([])


def test_a_feature_with_no_direction_is_refused():
    sae = load_sae("toy", 4)
    with torch.no_grad():
        sae.W_dec[45] = 0
    with pytest.raises(ValueError, match="features \\[45\\] have an all-zero decoder row"):
        feature_directions(sae, [45])


def test_lambda_sweep_takes_a_task_path(toy_lm, tmp_path, monkeypatch):
    from tvlib.cleanup import CleanupConfig
    from tvlib.experiments import lambda_sweep
    from tvlib.paths import TASKS_DIR
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path)
    quick = CleanupConfig(max_steps=2, patience=2, progress=False)
    sweep = lambda_sweep(toy_lm, str(TASKS_DIR / "antonyms.json"), 4, [0.01], TINY, quick)
    assert sweep.task.tolist() == ["antonyms"]


def test_the_embedded_model_refuses_inputs_longer_than_it_was_trained_on(toy_lm):
    """Its rotary config allows 512 positions, but it was trained on 128 tokens: prompts
    of 200-370 tokens gave NLL 3-9 instead of an error."""
    from tvlib.models import context_length, trace
    assert toy_lm._module.config.max_position_embeddings == 512
    assert context_length(toy_lm) == 128
    ids = torch.full((1, 200), 5, dtype=torch.long)
    with pytest.raises(ValueError, match="inputs of 200 tokens are longer than the model's "
                                         "context of 128 tokens"):
        with trace(toy_lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
            pass
