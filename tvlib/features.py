"""Reading SAE features over a text corpus: max-activating contexts and density.

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

from .hub import hub_files
from .saes import check_sae_site
from .sae_views import check_features
from .engine import check_batch_size, collect_residuals


def corpus_texts(preset, n_texts: int = 2000) -> list[str]:
    """The first ``n_texts`` texts of the preset's corpus for reading features.

    ``preset.corpus`` is a local JSON list of strings (the embedded model ships
    ``corpus.json``) or a hub dataset with a ``text`` column (real models).
    """
    from .presets import get_preset
    preset = get_preset(preset)
    if isinstance(n_texts, bool) or not isinstance(n_texts, int) or n_texts < 1:
        raise ValueError(f"n_texts must be a positive int, not {n_texts!r}")
    if preset.corpus is None:
        raise ValueError(f"preset {preset.name!r} names no corpus: pass your own list of texts "
                         "to tokenize_corpus (e.g. a slice of a pretraining dataset)")
    path = Path(preset.corpus)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        return json.loads(path.read_text(encoding="utf-8"))[:n_texts]
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
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (contexts per feature) must be a positive int, not {k!r}")
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


def context(tokenizer, input_ids: torch.Tensor, token: int, left: int = 12,
            right: int = 3) -> tuple[str, str, str]:
    """(text before, the token, text after) around ``token`` of one padded row."""
    ids = input_ids.tolist()
    special = set(tokenizer.all_special_ids)
    piece = lambda span: tokenizer.decode([i for i in span if i not in special])  # noqa: E731
    return (piece(ids[max(0, token - left):token]), tokenizer.decode([ids[token]]),
            piece(ids[token + 1:token + 1 + right]))


def examples_html(tokenizer, corpus: dict, top, density=None, links=None) -> str:
    """A compact HTML table: one line per feature, its top contexts with the token marked."""
    from html import escape

    ids = corpus["inputs"]["input_ids"]
    lines = ["<table style='font-size:11px'><tr><th>feature</th><th>density</th>"
             "<th>max-activating contexts (activation)</th></tr>"]
    for feature, group in top.groupby("feature", sort=False):
        shown = []
        for r in group.itertuples():
            before, tok, after = context(tokenizer, ids[r.doc], r.token)
            shown.append(f"{escape(before)}<b style='background:#fd6'>{escape(tok)}</b>"
                         f"{escape(after)} <span style='color:#888'>({r.activation:.1f})"
                         "</span>")
        name = str(feature)
        if links and links.get(feature):
            name = f"<a href='{links[feature]}' target='_blank'>{feature}</a>"
        dens = "" if density is None else f"{density[feature].item():.3f}"
        body = "<br>".join(s.replace("\n", "⏎") for s in shown)
        lines.append(f"<tr><td>{name}</td><td>{dens}</td><td style='text-align:left'>{body}"
                     "</td></tr>")
    return "\n".join(lines + ["</table>"])


def neuronpedia_url(sae, feature: int) -> str | None:
    """The feature's Neuronpedia page, where sae-lens records the SAE's Neuronpedia id."""
    feature = check_features(sae, [feature])[0]
    neuronpedia_id = sae.cfg.metadata.neuronpedia_id
    return f"https://www.neuronpedia.org/{neuronpedia_id}/{feature}" if neuronpedia_id else None
