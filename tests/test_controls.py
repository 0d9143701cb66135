"""The controls beside "the cleaned vector works" (tvlib.controls), on the embedded model."""

import math

import pandas as pd
import pytest
import torch

from tvlib.cleanup import CleanupConfig, cleanup
from tvlib.controls import (RULES, ControlsConfig, choose_scale, cleaned_norm_tv_row, control_rows,
                            hand_picked_features, random_direction_grid, random_direction_rows,
                            random_directions, scaled_tv_rows, tune_config,
                            tuned_hand_picked_rows)
from tvlib.interventions import Steering
from tvlib.scoring import score
from tvlib.experiments import (AT_CLEANED_NORM, BEST_SCALED, CLEANED, RANDOM, RAW, SCALED,
                               SteeringConfig, TUNED_TOP_COSINE, TUNED_TOP_ENCODING, TV, PromptConfig,
                               build_task_prompts, controls_report, controls_summary,
                               method_label, model_tasks, own_feature_wins, own_vs_random,
                               run_controls_sweep, run_steering_matrix)
from tvlib.saes import load_sae
from tvlib.taskvec import task_vectors

LAYER = 4
SMALL = PromptConfig(n_prompts=4, n_shots=4, n_eval=8, n_train=8)
TINY = PromptConfig(n_prompts=3, n_shots=3, n_eval=6, n_train=4)
STEPS = CleanupConfig(max_steps=4, patience=2, progress=False)


@pytest.fixture(scope="module")
def setup(toy_lm):
    task = model_tasks(toy_lm, ["antonyms"])["antonyms"]
    prompts = build_task_prompts(toy_lm.tokenizer, task, SMALL)
    tv = task_vectors(toy_lm, prompts.few_shot, [LAYER])[0]
    return {"train": prompts.train, "heldout": prompts.zero_shot, "tv": tv,
            "sae": load_sae("toy", LAYER, device="cpu")}


def spy_on_steering(monkeypatch):
    """The steering vectors tvlib.controls scores with, in order."""
    vectors = []

    def spy(lm, batch, steering=None, *args, **kwargs):
        vectors.append(None if steering is None else steering.vector.clone())
        return score(lm, batch, steering, *args, **kwargs)
    monkeypatch.setattr("tvlib.controls.score", spy)
    return vectors


# ---------------------------------------------------------------- scale

def test_best_scale_is_chosen_on_training_prompts_only(toy_lm, setup):
    """On this split the training and held-out prompts prefer different scales; the choice
    follows the prompts passed as ``train`` whichever way round they are passed."""
    train, heldout, tv = setup["train"], setup["heldout"], setup["tv"]
    scales = ControlsConfig().scales

    def argmin(batch):
        nll = [score(toy_lm, batch, Steering(LAYER, s * tv)).mean_nll() for s in scales]
        return scales[nll.index(min(nll))]

    on_train, on_heldout = argmin(train), argmin(heldout)
    assert on_train != on_heldout          # else this test could not see a leak
    for first, second, expected in ((train, heldout, on_train), (heldout, train, on_heldout)):
        rows = scaled_tv_rows(toy_lm, "antonyms", LAYER, tv, first, second)
        best = rows[rows.view == BEST_SCALED].iloc[0]
        assert best.scale == expected
        assert best.nll == score(toy_lm, second, Steering(LAYER, expected * tv)).mean_nll()


def test_choose_scale_scores_only_the_training_prompts(toy_lm, setup, monkeypatch):
    seen = []

    def spy(lm, batch, steering=None, *args, **kwargs):
        seen.append(batch)
        return score(lm, batch, steering, *args, **kwargs)
    monkeypatch.setattr("tvlib.controls.score", spy)
    choose_scale(toy_lm, LAYER, setup["tv"], setup["train"])
    assert len(seen) == len(ControlsConfig().scales)
    assert all(batch is setup["train"] for batch in seen)


def test_grid_goes_below_one_and_scale_one_is_the_plain_tv(toy_lm, setup):
    scales = ControlsConfig().scales
    assert 1 in scales and [s for s in scales if s < 1] == [0, 0.25, 0.5, 0.75]
    rows = scaled_tv_rows(toy_lm, "antonyms", LAYER, setup["tv"], setup["train"],
                          setup["heldout"])
    grid = rows[rows.view == SCALED]
    assert grid.scale.tolist() == list(scales) and set(grid.vector) == {TV}
    one = grid[grid.scale == 1].iloc[0]
    plain = score(toy_lm, setup["heldout"], Steering(LAYER, setup["tv"]))
    assert one.nll == plain.mean_nll() and one.accuracy == plain.accuracy()
    assert one.method == "TV x 1" and rows.method.is_unique


def test_tv_rescaled_to_the_cleaned_norm(toy_lm, setup, monkeypatch):
    vectors = spy_on_steering(monkeypatch)
    tv, norm = setup["tv"], 37.5
    row = cleaned_norm_tv_row(toy_lm, "antonyms", LAYER, tv, norm, setup["heldout"]).iloc[0]
    (vector,) = vectors
    assert vector.norm().item() == pytest.approx(norm, rel=1e-6)
    assert torch.allclose(vector / vector.norm(), tv / tv.norm(), atol=1e-6)
    assert row.view == AT_CLEANED_NORM and row.method == "TV at cleaned norm"
    assert row.scale == pytest.approx(norm / tv.norm().item())


# ---------------------------------------------------------------- random directions

def test_random_directions_have_the_cleaned_norm_differ_by_seed_and_reproduce(
        toy_lm, setup, monkeypatch):
    directions = random_directions(128, [0, 1, 2])                      # (3, d)
    assert torch.allclose(directions.norm(dim=-1), torch.ones(3))
    assert torch.equal(directions, random_directions(128, [0, 1, 2]))
    assert torch.equal(directions[1], random_directions(128, [1])[0])   # one seed, one direction
    assert not torch.allclose(directions[0], directions[1])
    vectors = spy_on_steering(monkeypatch)
    rows = random_direction_rows(toy_lm, "antonyms", LAYER, 37.5, setup["heldout"], [0, 1, 2])
    assert [v.norm().item() for v in vectors] == pytest.approx([37.5] * 3, rel=1e-6)
    assert rows.seed.tolist() == [0, 1, 2] and set(rows.vector) == {RANDOM}
    assert rows.nll.nunique() == 3
    assert rows.method.tolist() == [f"random at cleaned norm (seed {s})" for s in range(3)]
    again = random_direction_rows(toy_lm, "antonyms", LAYER, 37.5, setup["heldout"], [0, 1, 2])
    assert again.nll.tolist() == rows.nll.tolist()


# ---------------------------------------------------------------- hand-picked features

@pytest.mark.parametrize("k", [1, 3, 5])
def test_hand_picked_supports_follow_their_rules(setup, k):
    sae, tv = setup["sae"], setup["tv"]
    W = sae.W_dec.detach().float()
    cosine = torch.nn.functional.cosine_similarity(W, tv[None], dim=-1)      # (F,)
    by_cosine = cosine.argsort(descending=True)[:k].tolist()
    assert hand_picked_features(sae, tv, k, "cosine") == by_cosine
    encoding = sae.encode(tv[None])[0].detach()                             # (F,)
    picked = hand_picked_features(sae, tv, k, "encoding")
    assert picked == encoding.argsort(descending=True)[:k].tolist()
    assert (encoding[picked] > 0).all()


def test_tuning_changes_only_the_picked_weights_and_has_no_l1(toy_lm, setup):
    sae, tv = setup["sae"], setup["tv"]
    encoding = sae.encode(tv[None])[0].detach()
    off = int(((encoding == 0) & (sae.W_dec.norm(dim=-1) > 0)).nonzero()[0])   # not encoded
    support = [hand_picked_features(sae, tv, 1, "cosine")[0], off]
    tune = tune_config(CleanupConfig(max_steps=6, patience=2, lam=0.5, progress=False))
    assert (tune.lam, tune.max_steps, tune.patience) == (0.0, 6, 6)
    result = cleanup(toy_lm, sae, LAYER, tv, setup["train"], setup["heldout"], tune,
                     support=support)
    others = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
    others[support] = False
    assert (result.start_weights[support] > 0).all()   # the feature the encoding left off too
    assert (result.start_weights[others] == 0).all() and (result.weights[others] == 0).all()
    assert not torch.equal(result.weights[support], result.start_weights[support])
    assert result.start_weights[support[0]] == encoding[support[0]]   # encoded: its weight
    assert result.steps == 6 and result.loss == result.nll             # all steps; no L1


def test_a_support_of_every_encoded_feature_is_the_plain_cleanup(toy_lm, setup):
    sae, tv = setup["sae"], setup["tv"]
    active = (sae.encode(tv[None])[0] > 0).nonzero().flatten().tolist()
    cfg = tune_config(CleanupConfig(max_steps=3, progress=False))
    restricted = cleanup(toy_lm, sae, LAYER, tv, setup["train"], None, cfg, support=active)
    plain = cleanup(toy_lm, sae, LAYER, tv, setup["train"], None, cfg)
    assert torch.equal(restricted.weights, plain.weights) and restricted.nll == plain.nll


def test_tuned_rows_name_their_picks_and_reproduce(toy_lm, setup):
    args = (toy_lm, setup["sae"], "antonyms", LAYER, setup["tv"], 2, setup["train"],
            setup["heldout"], STEPS)
    rows = tuned_hand_picked_rows(*args, steps=3)
    assert rows.view.tolist() == [TUNED_TOP_COSINE, TUNED_TOP_ENCODING]
    for row, rule in zip(rows.itertuples(), RULES):
        assert row.features == ",".join(map(str, hand_picked_features(setup["sae"], setup["tv"],
                                                                      2, rule)))
        assert row.k == 2 and row.steps == 3 and row.l0 <= 2 and row.vector == TV
        assert row.method == method_label(TV, row.view, 2) and math.isfinite(row.nll)
    assert tuned_hand_picked_rows(*args, steps=3).equals(rows)


# ---------------------------------------------------------------- the sweep (notebook 04)

def test_controls_sweep_rows_report_and_cache(toy_lm, tmp_path, monkeypatch):
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path / "cache")
    controls = ControlsConfig(random_seeds=[3, 4], tune_steps=3)
    table = run_controls_sweep(toy_lm, ["antonyms"], [LAYER], TINY, STEPS, controls)
    layered = table[table.layer.notna()]
    assert layered.method.is_unique
    assert {RAW, CLEANED, SCALED, BEST_SCALED, AT_CLEANED_NORM, TUNED_TOP_COSINE,
            TUNED_TOP_ENCODING} <= set(layered.view)
    for row in layered[layered.view.isin([SCALED, BEST_SCALED, AT_CLEANED_NORM])].itertuples():
        seed = None if math.isnan(row.seed) else int(row.seed)
        scale = row.scale if row.view == SCALED else None
        assert row.method == method_label(row.vector, row.view, scale=scale, seed=seed)
    one = layered[(layered.view == SCALED) & (layered.scale == 1)].nll.item()
    assert one == layered[layered.view == RAW].nll.item()          # the TV the cleanup had
    cleaned = layered[layered.view == CLEANED].iloc[0]
    assert set(layered[layered.view == TUNED_TOP_COSINE].k) == {cleaned.l0}
    report = controls_report(table)
    assert report["features (cleaned)"].item() == cleaned.l0
    assert report["random nll (mean)"].item() == pytest.approx(
        layered[layered.vector == RANDOM].nll.mean())
    assert report["best scale"].item() in controls.scales
    assert controls_summary(report).startswith("cleaned TV below: TV ")
    again = run_controls_sweep(toy_lm, ["antonyms"], [LAYER], TINY, STEPS, controls)
    fresh = run_controls_sweep(toy_lm, ["antonyms"], [LAYER], TINY, STEPS, controls,
                               refresh=True)
    assert again.equals(table) and fresh.equals(table)     # cached; same seed, same numbers


def test_control_rows_skip_tuning_when_cleanup_kept_nothing(toy_lm, setup):
    sae = setup["sae"]
    rows = control_rows(toy_lm, sae, "antonyms", LAYER, setup["tv"], torch.zeros(sae.cfg.d_sae),
                        setup["train"], setup["heldout"], STEPS,
                        ControlsConfig(random_seeds=[0], tune_steps=2))
    assert not rows.view.isin([TUNED_TOP_COSINE, TUNED_TOP_ENCODING]).any()
    norm = sae.b_dec.detach().float().norm().item()        # decode(0) = b_dec
    at_norm = rows[rows.view == AT_CLEANED_NORM].iloc[0]
    assert at_norm.scale == pytest.approx(norm / setup["tv"].norm().item())


# ---------------------------------------------------------------- the steering matrix (06)

def test_steering_matrix_random_column(toy_lm, tmp_path, monkeypatch):
    from tvlib.plotting import plot_steering_matrix
    monkeypatch.setattr("tvlib.cache.CACHE_DIR", tmp_path)
    tasks, features = ["antonyms", "en_es"], {"antonyms": [45], "en_es": [322]}
    plain = run_steering_matrix(toy_lm, tasks, LAYER, features, TINY,
                                SteeringConfig(scale=20.0, random_seed=None))
    grid = run_steering_matrix(toy_lm, tasks, LAYER, features, TINY, SteeringConfig(20.0, 0))
    assert run_steering_matrix(toy_lm, tasks, LAYER, features, TINY).equals(grid)  # default
    random = grid[grid.feature.isna()]
    assert random.task.tolist() == tasks and set(random.feature_task) == {RANDOM}
    assert random.seed.tolist() == [0, 0]
    kept = grid[grid.feature.notna()].drop(columns="seed").astype({"feature": "int64"})
    assert kept.reset_index(drop=True).equals(plain)          # the features' cells unchanged
    direction = random_directions(128, [0])[0]
    for row in random.itertuples():
        batch = build_task_prompts(toy_lm.tokenizer, model_tasks(toy_lm, [row.task])[row.task],
                                   TINY).zero_shot
        loss = score(toy_lm, batch, Steering(LAYER, 20.0 * direction), 256).nll.mean().item()
        assert row.loss == loss
        assert row.base_loss == plain[plain.task == row.task].base_loss.iloc[0]
    assert own_feature_wins(grid).index.tolist() == tasks
    against = own_vs_random(grid)
    for task, own in (("antonyms", 45), ("en_es", 322)):
        change = grid[(grid.task == task) & (grid.feature == own)].relative_change.item()
        chance = random[random.task == task].relative_change.item()
        assert against.loc[task].tolist() == [change, chance, change < chance]
    with pytest.raises(ValueError, match="no random-direction column"):
        own_vs_random(plain)
    other = run_steering_matrix(toy_lm, tasks, LAYER, features, TINY, SteeringConfig(20.0, 1))
    assert other[other.feature.isna()].loss.tolist() != random.loss.tolist()
    fig = plot_steering_matrix(grid)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["45 (antonyms)", "322 (en_es)", "random (seed 0)"]


def test_steering_matrix_plot_keeps_its_heatmap_with_a_shared_feature():
    """A feature cleaned for several tasks gets one task per line of its label, and the
    heatmap keeps its height (on one line such a label squeezed it to nothing); a long
    title does not run into the colorbar's label."""
    from tvlib.plotting import plot_steering_matrix
    tasks = ["antonyms", "country_capital", "present_simple_past_simple", "en_es"]
    columns = [(533, "antonyms"), (3886, "country_capital+present_simple_past_simple"),
               (1588, "en_es"), (None, RANDOM)]
    grid = pd.DataFrame([{"task": t, "feature": f, "feature_task": ft, "seed": 0 if f is None
                          else None, "relative_change": 0.1} for t in tasks for f, ft in columns])
    fig = plot_steering_matrix(grid, title="Task features, layer 12, scale 3000 "
                                           "(gemma-3-270m-offline)")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[1] == "3886 (country_capital,\npresent_simple_past_simple)"
    fig.canvas.draw()
    heatmap = fig.axes[0].get_position()               # figure fraction, after tight_layout
    assert heatmap.height > 0.2
    # a long title ends a quarter inch or more before the colorbar's label (at 6 inches
    # wide, the gap was under a tenth: the two touched)
    renderer = fig.canvas.get_renderer()
    title = fig.axes[0].title.get_window_extent(renderer)
    colorbar_label = fig.axes[1].yaxis.label.get_window_extent(renderer)
    assert (colorbar_label.x0 - title.x1) / fig.dpi > 0.25


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("settings, match", [
    ({"scales": []}, "non-empty list of distinct values that each be a finite number >= 0"),
    ({"scales": [0.5, -1, 1]}, "each be a finite number >= 0"),
    ({"scales": [0.5, math.nan, 1]}, "each be a finite number >= 0"),
    ({"scales": [0.5, 1, 1]}, "list of distinct values"),
    ({"scales": [1, 2, 4]}, "include 1 .* and a value below 1"),
    ({"scales": [0.5, 2]}, "include 1"),
    ({"random_seeds": []}, "non-empty list of distinct values that each be an int"),
    ({"random_seeds": [0, 0]}, "list of distinct values"),
    ({"random_seeds": [0.5]}, "each be an int"),
    ({"rules": ["dot"]}, "distinct values that each be one of 'cosine', 'encoding'"),
    ({"tune_steps": 0}, "int >= 1 or None"),
])
def test_bad_controls_config_is_refused(settings, match):
    name = next(iter(settings))
    with pytest.raises(ValueError, match=f"ControlsConfig.{name}=.*{match}"):
        ControlsConfig(**settings)


def test_bad_arguments_are_refused(toy_lm, setup):
    sae, tv, train, heldout = setup["sae"], setup["tv"], setup["train"], setup["heldout"]
    for k in (0, 2.5, sae.cfg.d_sae + 1, True):
        with pytest.raises(ValueError, match="k=.*number of features to pick"):
            hand_picked_features(sae, tv, k, "cosine")
    with pytest.raises(ValueError, match="rule='dot' is unknown"):
        hand_picked_features(sae, tv, 2, "dot")
    active = int((sae.encode(tv[None]) > 0).sum())
    with pytest.raises(ValueError, match=f"activates {active} features, fewer than"):
        hand_picked_features(sae, tv, active + 1, "encoding")
    with pytest.raises(ValueError, match="tv must be one vector of shape \\(128,\\)"):
        hand_picked_features(sae, tv[:64], 2, "cosine")
    with pytest.raises(ValueError, match="zero or holds NaN"):
        choose_scale(toy_lm, LAYER, torch.full_like(tv, math.nan), train)
    for norm in (0, -1.0, math.nan, "37"):
        with pytest.raises(ValueError, match="the cleaned vector's norm must be"):
            random_direction_rows(toy_lm, "antonyms", LAYER, norm, heldout)
    with pytest.raises(ValueError, match="cleaned_weights must be the cleanup's weights"):
        control_rows(toy_lm, sae, "antonyms", LAYER, tv, torch.zeros(5), train, heldout)
    with pytest.raises(ValueError, match="d=0: the width must be an int >= 1"):
        random_directions(0, [0])
    with pytest.raises(ValueError, match="scale=inf: must be a finite number"):
        random_direction_grid(toy_lm, {"antonyms": heldout}, LAYER, math.inf, 0)
    with pytest.raises(ValueError, match="controls must be a ControlsConfig"):
        run_controls_sweep(toy_lm, ["antonyms"], [LAYER], TINY, STEPS, {"scales": [1]})
    with pytest.raises(ValueError, match="SteeringConfig.random_seed='0': must be an int or "
                                         "None; pass e.g. random_seed=0"):
        SteeringConfig(random_seed="0")
    with pytest.raises(ValueError, match="SteeringConfig.scale=nan: must be a finite number"):
        SteeringConfig(scale=math.nan)
    with pytest.raises(ValueError, match="steering must be a SteeringConfig, not float"):
        run_steering_matrix(toy_lm, ["antonyms"], LAYER, {"antonyms": [45]}, TINY, 20.0)
    with pytest.raises(ValueError, match="labelled with its scale"):
        method_label(TV, SCALED)


@pytest.mark.parametrize("support, match", [
    ([], "support is empty"), ([5, 5], "lists features \\[5\\] more than once"),
    ([-1], "is not a feature of this SAE"), ([1024], "is not a feature of this SAE"),
    (5, "must be a list of feature indices")])
def test_bad_supports_are_refused(toy_lm, setup, support, match):
    with pytest.raises(ValueError, match=match):
        cleanup(toy_lm, setup["sae"], LAYER, setup["tv"], setup["train"], None, STEPS,
                support=support)
