"""Reading SAE features: activation density over a text corpus.

Density is the fraction of corpus tokens (BOS and padding excluded) on which a
feature is active; dense features fire almost everywhere and say little about
a task.
"""

from __future__ import annotations

import torch

from .taskvec import collect_residuals


def corpus_texts(preset_name: str, n_documents: int = 300, seed: int = 3000) -> list[str]:
    """The default text corpus of a preset: the embedded model's own training mix."""
    if preset_name != "toy":
        raise ValueError(f"no built-in corpus for preset {preset_name!r}: pass your own list "
                         "of texts (e.g. a slice of a pretraining dataset)")
    from .toy import ToyConfig, generate_documents
    return generate_documents(ToyConfig(), n_documents, seed)


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


@torch.no_grad()
def corpus_activations(lm, sae, layer: int, corpus: dict, batch_size: int = 32) -> torch.Tensor:
    """SAE feature activations on every counted corpus token: (n_tokens, F)."""
    ids = corpus["inputs"]["input_ids"]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    resid = collect_residuals(lm, corpus["inputs"], [layer], positions, batch_size)[0]
    return sae.encode(resid[corpus["counted"]].to(sae.W_dec.dtype))


def activation_density(acts: torch.Tensor) -> torch.Tensor:
    """(F,) fraction of tokens on which each feature is active."""
    return (acts > 0).float().mean(0)
