"""What tvlib reads of each model family, in one table: where the transformer blocks,
the final norm and the unembedding are, and what the final norm does to a direction.

One row per Hugging Face ``config.model_type``; a Llama-like family needs one row
(``ARCHITECTURES["qwen2"] = LLAMA_LIKE``, once its final norm is checked to be Llama's).
Everything else tvlib needs it reads from the model's config (``hidden_size``,
``max_position_embeddings``, which GPT-2's config maps to its own names).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps what tvlib reads (attribute paths from the causal LM)."""

    body: str               # the decoder stack (its output: the last hidden state)
    blocks: str             # the list of transformer blocks, in order
    final_norm: str         # the norm applied to the last residual before the unembedding
    norm_centres: bool      # LayerNorm (subtracts the mean first) rather than RMSNorm
    norm_offset: bool       # the norm scales by 1 + weight (Gemma) rather than weight
    unembedding: str = "lm_head"


LLAMA_LIKE = Architecture("model", "model.layers", "model.norm", norm_centres=False,
                          norm_offset=False)        # LlamaRMSNorm: weight * x / rms(x)
GEMMA_LIKE = replace(LLAMA_LIKE, norm_offset=True)  # GemmaRMSNorm: (1 + weight) * x / rms(x)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_LIKE,
    "gemma": GEMMA_LIKE,
    "gemma2": GEMMA_LIKE,
    "gemma3_text": GEMMA_LIKE,
    # LayerNorm: weight * (x - mean) / std + bias
    "gpt2": Architecture("transformer", "transformer.h", "transformer.ln_f",
                         norm_centres=True, norm_offset=False),
}


def architecture(model) -> Architecture:
    """The row of ``model``'s family (a Hugging Face model, or an nnsight wrapper of one)."""
    module = getattr(model, "_module", model)
    model_type = getattr(module.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"tvlib does not know model family {model_type!r} ({type(module).__name__}); "
            f"known families: {sorted(ARCHITECTURES)}. Add a row to "
            "tvlib.architectures.ARCHITECTURES: where its blocks, final norm and unembedding "
            "are, whether the final norm centres and whether it scales by 1 + weight "
            "(a Llama-like family: ARCHITECTURES[model_type] = LLAMA_LIKE)")
    return ARCHITECTURES[model_type]


def submodule(model, path: str):
    """The attribute at dotted ``path`` of ``model`` (an nnsight wrapper gives its proxy)."""
    for name in path.split("."):
        model = getattr(model, name)
    return model
