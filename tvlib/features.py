"""Reading SAE features over a text corpus: max-activating contexts and density; and
the tokens each feature's decoder direction promotes and suppresses (its logit table).

Density is the fraction of corpus tokens (BOS and padding excluded) on which a
feature is active; dense features fire almost everywhere and say little about
a task. Public SAEs also get a link to their Neuronpedia page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .checks import POSITIVE_INT, check
from .hub import hub_files
from .models import final_norm_scale, unembedding
from .saes import check_sae_site
from .sae_views import check_features
from .interventions import check_batch_size, collect_residuals


def corpus_texts(preset, n_texts: int = 2000) -> list[str]:
    """The first ``n_texts`` texts of the preset's corpus for reading features.

    ``preset.corpus`` is a local JSON list of strings (the embedded model ships
    ``corpus.json``) or a hub dataset with a ``text`` column (real models).
    """
    from .presets import get_preset
    preset = get_preset(preset)
    check("n_texts", n_texts, POSITIVE_INT, "pass e.g. n_texts=2000")
    if preset.corpus is None:
        raise ValueError(f"preset {preset.name!r} names no corpus: pass your own list of texts "
                         "to tokenize_corpus (e.g. a slice of a pretraining dataset)")
    path = Path(preset.corpus)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        try:
            texts = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"corpus file {path} is not valid UTF-8 JSON ({err}): restore it "
                             "(git, or rebuild it) or point the preset's corpus elsewhere") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"corpus file {path} must hold a JSON list of strings, not "
                             f"{type(texts).__name__}" + (" with other items" if
                                                          isinstance(texts, list) else ""))
        return texts[:n_texts]
    import datasets
    with hub_files(preset.corpus, "dataset", "*", repo_type="dataset"):
        rows = datasets.load_dataset(preset.corpus, split=f"train[:{n_texts}]")
    return list(rows["text"])


def tokenize_corpus(tokenizer, texts: list[str], max_length: int = 128) -> dict:
    """Left-padded model inputs for ``texts`` and a mask of the tokens that count."""
    if not texts:
        raise ValueError("empty corpus: pass at least one text")
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                    max_length=max_length)
    mask = enc["attention_mask"].bool()
    if tokenizer.bos_token_id is not None:
        mask &= enc["input_ids"] != tokenizer.bos_token_id
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
              "position_ids": position_ids}
    return {"inputs": inputs, "counted": mask}


@dataclass
class FeatureReading:
    top: pd.DataFrame        # (feature, rank, activation, doc, token) of the top-k contexts
    density: torch.Tensor    # (F,) fraction of counted tokens on which each feature fires


@torch.no_grad()
def read_features(lm, sae, layer: int, corpus: dict, features=(), k: int = 8,
                  batch_size: int = 32) -> FeatureReading:
    """One pass over the corpus: the ``k`` top contexts of ``features`` and every density.

    Memory stays at one batch of activations, whatever the corpus size.
    """
    check_sae_site(sae, lm, layer)
    features = torch.as_tensor(check_features(sae, features), dtype=torch.long)
    check("k", k, POSITIVE_INT, "pass the number of contexts per feature, e.g. k=8")
    check_batch_size(batch_size)
    inputs, counted = corpus["inputs"], corpus["counted"]
    if not counted.any():
        raise ValueError("the corpus has no tokens to count (every token is BOS or padding): "
                         "pass texts with words in them")
    n_docs, width = inputs["input_ids"].shape
    fires = torch.zeros(sae.cfg.d_sae)
    best_vals = torch.full((len(features), k), -torch.inf)
    best_where = torch.zeros((len(features), k), dtype=torch.long)     # flat token index
    for start in range(0, n_docs, batch_size):
        chunk = {name: t[start:start + batch_size] for name, t in inputs.items()}
        rows = chunk["input_ids"].shape[0]
        positions = torch.arange(width).expand(rows, width)
        resid = collect_residuals(lm, chunk, [layer], positions, rows)[0]   # (b, T, d)
        mask = counted[start:start + rows]                                  # (b, T)
        acts = sae.encode(resid.to(sae.W_dec)).float()      # (b, T, F), on the SAE's device
        on_device = mask.to(acts.device)
        fires += (acts[on_device] > 0).sum(0).cpu()
        if len(features):
            picked = acts[..., features.to(acts.device)].masked_fill(
                ~on_device[..., None], -torch.inf).cpu()                    # (b, T, f)
            flat = picked.reshape(-1, len(features)).T                      # (f, b*T)
            where = torch.arange(flat.shape[1]) + start * width
            merged_vals = torch.cat([best_vals, flat], dim=1)
            merged_where = torch.cat([best_where, where.expand(len(features), -1)], dim=1)
            top = merged_vals.topk(k, dim=1)
            best_vals, best_where = top.values, merged_where.gather(1, top.indices)
    rows = []
    for i, feature in enumerate(features.tolist()):
        for rank in range(k):
            if best_vals[i, rank] > 0:
                doc, token = divmod(best_where[i, rank].item(), width)
                rows.append({"feature": feature, "rank": rank,
                             "activation": best_vals[i, rank].item(), "doc": doc,
                             "token": token})
    top = pd.DataFrame(rows, columns=["feature", "rank", "activation", "doc", "token"])
    return FeatureReading(top, fires / counted.sum())


def visible_token(tokenizer, token_id: int) -> str:
    """A token's text, readable in a table: each space shown as ``␣``, a line break as ``⏎``,
    a tab as ``⇥``; a token that is not text on its own (one byte of a character, which
    decodes to ``�``) is shown as the tokenizer writes it (``<0xE2>``, ``âĢ``)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text or not text:
        text = str(tokenizer.convert_ids_to_tokens(token_id))
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")


LOGIT_COLUMNS = ["feature", "direction", "rank", "token_id", "token", "effect"]


@torch.no_grad()
def logit_table(lm, sae, features, k: int = 10, batch_size: int = 64) -> pd.DataFrame:
    """The ``k`` tokens each feature's decoder direction promotes and suppresses most.

    effect = (W_dec[f] * s) @ W_U^T, s the final norm's elementwise scale
    (``models.final_norm_scale``: Gemma's 1 + weight, Llama's, the embedded model's and
    GPT-2's weight; for GPT-2's LayerNorm W_dec[f] is centred first, as the norm does): the
    direct effect on the logits of the feature's decoder row in the last residual, per unit
    of the row as the SAE stores it, with the norm folded into the unembedding as
    TransformerLens's ``fold_ln`` (its default) does; the logit table SAEDashboard and
    Neuronpedia show. Left out: the norm's 1 / rms (it depends on the whole residual; it
    scales every effect alike), final-logit soft-capping (monotonic), and TransformerLens's
    ``center_unembed``, which shifts all of a feature's effects by one constant (same ranks).

    Returns one row per (feature, direction, rank), columns ``LOGIT_COLUMNS``, features in
    the order given (each once): direction "promotes" (largest effect first) or
    "suppresses" (most negative first), rank from 0, the token's id and its text
    (``visible_token``: spaces as ``␣``). Computed in float32 on the unembedding's device
    (the SAE's decoder rows are moved there), one matrix product per ``batch_size`` features.
    """
    features = list(dict.fromkeys(check_features(sae, features)))     # each feature once
    check("k", k, POSITIVE_INT, "pass the number of tokens per direction, e.g. k=10")
    check_batch_size(batch_size)
    W_U = unembedding(lm)                                                  # (V, d)
    scale, centres = final_norm_scale(lm)
    n_tokens = min(W_U.shape[0], len(lm.tokenizer))   # rows past the tokenizer are no token
    if k > n_tokens:
        raise ValueError(f"k={k} is more than the {n_tokens} tokens of the vocabulary")
    if W_U.shape[1] != sae.cfg.d_in:
        raise ValueError(f"this SAE's decoder writes vectors of width {sae.cfg.d_in}, but the "
                         f"model's unembedding reads {W_U.shape[1]}: use the SAE made for it")
    W_U = W_U[:n_tokens].float()          # a float32 copy only when the model is not float32
    scale = scale.to(W_U.device)
    rows = []
    for start in range(0, len(features), batch_size):
        batch = features[start:start + batch_size]
        index = torch.tensor(batch, device=sae.W_dec.device)
        directions = sae.W_dec.detach()[index].to(W_U.device, torch.float32)    # (f, d)
        dead = [f for f, zero in zip(batch, (directions == 0).all(-1).tolist()) if zero]
        if dead:
            raise ValueError(f"features {dead} have an all-zero decoder row: they promote "
                             "no token; leave them out")
        if centres:
            directions = directions - directions.mean(-1, keepdim=True)
        effect = (directions * scale) @ W_U.T                                # (f, V)
        found = {"promotes": effect.topk(k, dim=-1),
                 "suppresses": effect.topk(k, dim=-1, largest=False)}
        found = {name: (f.values.cpu().tolist(), f.indices.cpu().tolist())
                 for name, f in found.items()}
        for i, feature in enumerate(batch):
            for name, (values, ids) in found.items():
                rows += [(feature, name, rank, ids[i][rank],
                          visible_token(lm.tokenizer, ids[i][rank]), values[i][rank])
                         for rank in range(k)]
    return pd.DataFrame(rows, columns=LOGIT_COLUMNS)


def context(tokenizer, input_ids: torch.Tensor, token: int, left: int = 12,
            right: int = 3) -> tuple[str, str, str]:
    """(text before, the token, text after) around ``token`` of one padded row, as the
    tokenizer writes the whole window: the spaces between tokens stay where they are (a
    token decoded alone loses the space a word-level tokenizer puts before it)."""
    ids = input_ids.tolist()
    special = set(tokenizer.all_special_ids)
    start = max(0, token - left)
    text = lambda end: tokenizer.decode([i for i in ids[start:end] if i not in special])  # noqa: E731
    before, through, window = text(token), text(token + 1), text(token + 1 + right)
    if through.startswith(before) and window.startswith(through):
        return before, through[len(before):], window[len(through):]
    # a tokenizer whose decoding of a prefix is not a prefix: pieces, spaced
    piece = lambda span: tokenizer.decode([i for i in span if i not in special])  # noqa: E731
    return (piece(ids[start:token]) + " ", tokenizer.decode([ids[token]]),
            " " + piece(ids[token + 1:token + 1 + right]))


def examples_html(tokenizer, corpus: dict, top, density=None, links=None, logits=None,
                  n_logits: int = 6) -> str:
    """A compact HTML table: one line per feature, its top contexts with the token marked.

    ``logits``: a ``logit_table`` of the same features; each line then also shows the
    ``n_logits`` tokens the feature promotes and suppresses most, with their effect (a
    feature that never fires on the corpus is then shown too, with its logits only).
    """
    from html import escape

    if logits is not None:
        missing = set(LOGIT_COLUMNS) - set(getattr(logits, "columns", ()))
        if missing:
            raise ValueError(f"logits must be a logit_table (columns {LOGIT_COLUMNS}); this "
                             f"table lacks {sorted(missing)}")
        check("n_logits", n_logits, POSITIVE_INT, "pass e.g. n_logits=6")
    ids = corpus["inputs"]["input_ids"]
    header = "<th>max-activating contexts (activation)</th>"
    if logits is not None:
        header += "<th>promotes (logit effect)</th><th>suppresses</th>"
    lines = ["<table style='font-size:11px'><tr><th>feature</th><th>density</th>"
             f"{header}</tr>"]
    groups = dict(list(top.groupby("feature", sort=False)))
    features = list(groups)
    if logits is not None:
        features = list(dict.fromkeys(features + [int(f) for f in logits.feature]))
    for feature in features:
        shown = []
        for r in groups[feature].itertuples() if feature in groups else ():
            before, tok, after = context(tokenizer, ids[r.doc], r.token)
            space = tok[:len(tok) - len(tok.lstrip())]     # the mark covers the token only
            before, tok = before + space, tok[len(space):]
            shown.append(f"{escape(before)}<b style='background:#fd6'>{escape(tok)}</b>"
                         f"{escape(after)} <span style='color:#888'>({r.activation:.1f})"
                         "</span>")
        name = str(feature)
        if links and links.get(feature):
            name = f"<a href='{links[feature]}' target='_blank'>{feature}</a>"
        dens = "" if density is None else f"{density[feature].item():.3f}"
        body = "<br>".join(s.replace("\n", "⏎") for s in shown) or \
            "<span style='color:#888'>(not active on the corpus)</span>"
        cells = f"<td style='text-align:left'>{body}</td>"
        if logits is not None:
            mine = logits[logits.feature == feature]
            for direction, colour in (("promotes", "#dfd"), ("suppresses", "#fdd")):
                rows = mine[(mine.direction == direction) & (mine["rank"] < n_logits)]
                cells += "<td style='text-align:left;white-space:nowrap'>" + "<br>".join(
                    f"<span style='background:{colour}'>{escape(r.token)}</span> "
                    f"<span style='color:#888'>{r.effect:+.2f}</span>"
                    for r in rows.sort_values("rank").itertuples()) + "</td>"
        lines.append(f"<tr><td>{name}</td><td>{dens}</td>{cells}</tr>")
    return "\n".join(lines + ["</table>"])


def neuronpedia_url(sae, feature: int) -> str | None:
    """The feature's Neuronpedia page, where sae-lens records the SAE's Neuronpedia id."""
    feature = check_features(sae, [feature])[0]
    neuronpedia_id = sae.cfg.metadata.neuronpedia_id
    return f"https://www.neuronpedia.org/{neuronpedia_id}/{feature}" if neuronpedia_id else None
