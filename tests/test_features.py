import pytest
import torch

from tvlib.features import (corpus_texts, examples_html, neuronpedia_url, read_features,
                            tokenize_corpus)
from tvlib.saes import load_sae
from tvlib.engine import collect_residuals


@pytest.fixture(scope="module")
def corpus(toy_lm):
    return tokenize_corpus(toy_lm.tokenizer, corpus_texts("toy")[:40])


def brute_force(lm, sae, layer, corpus):
    ids = corpus["inputs"]["input_ids"]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    resid = collect_residuals(lm, corpus["inputs"], [layer], positions)[0]
    with torch.no_grad():
        return sae.encode(resid)                                       # (N, T, F)


def test_streamed_reading_matches_brute_force(toy_lm, corpus):
    sae, layer = load_sae("toy", 4), 4
    acts = brute_force(toy_lm, sae, layer, corpus)
    counted = corpus["counted"]
    density = (acts[counted] > 0).float().mean(0)
    features = density.topk(3).indices.tolist()
    reading = read_features(toy_lm, sae, layer, corpus, features, k=5, batch_size=7)
    torch.testing.assert_close(reading.density, density)
    for feature in features:
        values = acts[..., feature].masked_fill(~counted, -1).flatten()
        expected = values.topk(5).values
        got = reading.top[reading.top.feature == feature]
        torch.testing.assert_close(torch.tensor(got.activation.values, dtype=torch.float32),
                                   expected, atol=1e-4,
                                   rtol=1e-4)
        doc, token = int(got.doc.iloc[0]), int(got.token.iloc[0])
        assert acts[doc, token, feature] == pytest.approx(got.activation.iloc[0], 1e-4)
        assert counted[doc, token]                      # never BOS or padding


def test_html_marks_the_activating_token(toy_lm, corpus):
    sae = load_sae("toy", 4)
    densest = int(read_features(toy_lm, sae, 4, corpus).density.argmax())
    reading = read_features(toy_lm, sae, 4, corpus, [densest], k=2)
    doc, token = int(reading.top.doc.iloc[0]), int(reading.top.token.iloc[0])
    token = toy_lm.tokenizer.decode([corpus["inputs"]["input_ids"][doc, token]])
    html = examples_html(toy_lm.tokenizer, corpus, reading.top, reading.density)
    assert f"<b style='background:#fd6'>{token}</b>" in html


def test_neuronpedia_links_only_where_known():
    sae = load_sae("toy", 1)
    assert neuronpedia_url(sae, 3) is None
    sae.cfg.metadata.neuronpedia_id = "gpt2-small/0-res-jb"
    assert neuronpedia_url(sae, 3) == "https://www.neuronpedia.org/gpt2-small/0-res-jb/3"


def test_corpus_errors(toy_lm):
    import dataclasses

    from tvlib.presets import get_preset
    with pytest.raises(ValueError, match="preset 'toy' names no corpus"):
        corpus_texts(dataclasses.replace(get_preset("toy"), corpus=None))
    with pytest.raises(ValueError, match="empty corpus"):
        tokenize_corpus(toy_lm.tokenizer, [])
