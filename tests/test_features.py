import pytest
import torch

from tvlib.features import (LOGIT_COLUMNS, corpus_texts, examples_html, logit_table,
                            neuronpedia_url, read_features, tokenize_corpus, visible_token)
from tvlib.saes import load_sae
from tvlib.interventions import collect_residuals


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


def expected_effect(sae, features, scale, W_U, centre=False):
    """(f, V): the decoder rows through the final norm's scale, by hand, then W_U^T."""
    rows = sae.W_dec.detach()[features].float()
    if centre:
        rows = rows - rows.mean(-1, keepdim=True)
    return (rows * scale.float()) @ W_U.float().T


def check_table(table, features, effect, k, tokenizer):
    """Every feature's top-k and bottom-k tokens and values, in order, against ``effect``."""
    assert list(table.columns) == LOGIT_COLUMNS
    assert list(dict.fromkeys(table.feature)) == features
    for i, feature in enumerate(features):
        for direction, largest in (("promotes", True), ("suppresses", False)):
            rows = table[(table.feature == feature) & (table.direction == direction)]
            expected = effect[i].topk(k, largest=largest)
            assert rows["rank"].tolist() == list(range(k))
            assert rows.token_id.tolist() == expected.indices.tolist()
            torch.testing.assert_close(torch.tensor(rows.effect.tolist()), expected.values)
            values = rows.effect.tolist()     # promoted descending, suppressed ascending
            assert values == sorted(values, reverse=largest)
            assert rows.token.tolist() == [visible_token(tokenizer, t) for t in rows.token_id]


def test_logit_table_matches_a_direct_computation(toy_lm):
    sae = load_sae("toy", 4)
    features, k = [5, 0, 77, 5], 7                      # a repeat is listed once
    table = logit_table(toy_lm, sae, features, k=k, batch_size=2)
    inner = toy_lm._module
    effect = expected_effect(sae, [5, 0, 77], inner.model.norm.weight, inner.lm_head.weight)
    check_table(table, [5, 0, 77], effect, k, toy_lm.tokenizer)
    assert len(table) == 3 * 2 * k
    # the norm's scale matters: without it the order is another
    unscaled = expected_effect(sae, [5], torch.ones(sae.cfg.d_in), inner.lm_head.weight)
    assert unscaled[0].topk(k).indices.tolist() != table.token_id[:k].tolist()
    check_norm_forward(toy_lm, sae, inner.model.norm)


def test_visible_token_shows_spaces_and_line_breaks(bpe_tokenizer, word_tokenizer):
    space = bpe_tokenizer(" cold", add_special_tokens=False)["input_ids"]
    assert visible_token(bpe_tokenizer, space[0]).startswith("␣")
    newline = word_tokenizer.convert_tokens_to_ids("\n")
    assert visible_token(word_tokenizer, newline) == "⏎"


@pytest.fixture(scope="module", params=["gemma-3-270m", "gemma-2-2b", "gemma-2b", "gpt2"])
def standin(request, tmp_path_factory):
    """A tiny random model of the family, its final norm given random weights (and bias)."""
    from tvlib.models import load_model
    from tvlib.standins import make_standin
    folder = tmp_path_factory.mktemp(request.param)
    make_standin(request.param, folder, n_layers=2, d_model=16)
    lm = load_model(folder, device="cpu")
    generator = torch.Generator().manual_seed(1)
    norm = lm._module.get_submodule("transformer.ln_f" if request.param == "gpt2"
                                    else "model.norm")
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=generator))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))
    return request.param, lm, load_sae(folder, 1), norm


def test_logit_table_folds_each_familys_final_norm(standin):
    """Gemma scales by 1 + weight, GPT-2 centres then scales by weight: by hand."""
    family, lm, sae, norm = standin
    features, k = [0, 3, 40], 5
    table = logit_table(lm, sae, features, k=k)
    W_U = lm._module.lm_head.weight
    if family == "gpt2":
        effect = expected_effect(sae, features, norm.weight, W_U, centre=True)
    else:
        effect = expected_effect(sae, features, 1 + norm.weight, W_U)
        wrong = expected_effect(sae, features, norm.weight, W_U)   # Llama's convention
        assert wrong[0].topk(k).indices.tolist() != effect[0].topk(k).indices.tolist()
    check_table(table, features, effect, k, lm.tokenizer)


def test_logit_table_is_the_final_norm_as_the_model_applies_it(standin):
    family, lm, sae, norm = standin
    check_norm_forward(lm, sae, norm)


def check_norm_forward(lm, sae, norm, features=(1, 2, 9)):
    """effect is, up to one positive factor (1 / rms or 1 / std), the logits of the norm
    module's own output for the decoder row, its bias (the norm of zero) taken off."""
    features = list(features)
    table = logit_table(lm, sae, features, k=lm._module.config.vocab_size)
    with torch.no_grad():
        rows = sae.W_dec.detach()[features].float()
        through = norm(rows) - norm(torch.zeros_like(rows))
        forward = through @ lm._module.lm_head.weight.T                     # (f, V)
    for i, feature in enumerate(features):
        got = table[(table.feature == feature) & (table.direction == "promotes")]
        effect = torch.zeros(forward.shape[1])
        effect[torch.tensor(got.token_id.tolist())] = torch.tensor(got.effect.tolist())
        factor = effect.norm() / forward[i].norm()
        torch.testing.assert_close(effect, factor * forward[i], atol=1e-4, rtol=1e-4)
        assert (effect @ forward[i]) > 0


def test_logit_table_refuses_bad_arguments(toy_lm, monkeypatch):
    sae = load_sae("toy", 4)
    for k in (0, -1, True, 2.5, "3"):
        with pytest.raises(ValueError, match="k=.*: must be an int >= 1; pass the number of tokens"):
            logit_table(toy_lm, sae, [1], k=k)
    with pytest.raises(ValueError, match="more than the 2291 tokens"):
        logit_table(toy_lm, sae, [1], k=5000)
    for features in (3, [-1], [sae.cfg.d_sae], ["1"]):
        with pytest.raises(ValueError, match="feature"):
            logit_table(toy_lm, sae, features)
    with pytest.raises(ValueError, match="batch_size=0: must be an int >= 1"):
        logit_table(toy_lm, sae, [1], batch_size=0)
    dead = load_sae("toy", 4)
    with torch.no_grad():
        dead.W_dec[3] = 0
    with pytest.raises(ValueError, match=r"features \[3\] have an all-zero decoder row"):
        logit_table(toy_lm, dead, [1, 3])
    wide = load_sae("toy", 4)
    wide.cfg.d_in = 64
    with pytest.raises(ValueError, match="width 64"):
        logit_table(toy_lm, wide, [1])
    monkeypatch.setattr(toy_lm._module.config, "model_type", "bert")
    with pytest.raises(ValueError, match="does not know model family 'bert'"):
        logit_table(toy_lm, sae, [1])


def test_html_shows_promoted_and_suppressed_tokens(toy_lm, corpus):
    from html import escape
    sae = load_sae("toy", 4)
    reading = read_features(toy_lm, sae, 4, corpus, [0, 5], k=2)
    silent = int(reading.density.argmin())              # never fires on the corpus
    assert reading.density[silent] == 0
    logits = logit_table(toy_lm, sae, [0, 5, silent], k=8)
    html = examples_html(toy_lm.tokenizer, corpus, reading.top, reading.density, logits=logits,
                         n_logits=3)
    assert "<th>promotes (logit effect)</th><th>suppresses</th>" in html
    for feature in (0, 5, silent):
        line = next(l for l in html.splitlines() if l.startswith(f"<tr><td>{feature}</td>"))
        mine = logits[logits.feature == feature]
        for direction in ("promotes", "suppresses"):
            rows = mine[mine.direction == direction]
            for r in rows.itertuples():
                assert (f">{escape(r.token)}</span> <span style='color:#888'>{r.effect:+.2f}"
                        in line) == (r.rank < 3)
    assert "(not active on the corpus)" in html
    with pytest.raises(ValueError, match="logits must be a logit_table"):
        examples_html(toy_lm.tokenizer, corpus, reading.top, logits=reading.top)
    with pytest.raises(ValueError, match="n_logits=0: must be an int >= 1; pass e.g. n_logits=6"):
        examples_html(toy_lm.tokenizer, corpus, reading.top, logits=logits, n_logits=0)


@pytest.mark.parametrize("tokenizer_name", ["word_tokenizer", "bpe_tokenizer"])
def test_feature_contexts_read_as_the_text_was_written(tokenizer_name, request):
    """The highlighted token used to be decoded alone, losing its space: 'attack->defend',
    'asleepisawake'."""
    from tvlib.features import context
    tokenizer = request.getfixturevalue(tokenizer_name)
    text = "the opposite of attack is defend" if tokenizer_name == "word_tokenizer" \
        else "hot -> cold\nbig -> small"
    ids = torch.tensor(tokenizer(text)["input_ids"])
    special = set(tokenizer.all_special_ids)
    whole = tokenizer.decode([i for i in ids.tolist() if i not in special])
    for token in range(len(ids)):
        if int(ids[token]) in special:
            continue
        before, tok, after = context(tokenizer, ids, token, left=len(ids), right=len(ids))
        assert before + tok + after == whole
    before, tok, after = context(tokenizer, ids, len(ids) - 1)
    assert tok.strip() and tok.startswith(" ")       # its space kept before it
