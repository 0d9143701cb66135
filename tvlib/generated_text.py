"""Text a model writes itself, sampled from its BOS token.

Offline there is no web text to download. Like the writeup's authors, who trained
their Phi-3 SAEs on a model-generated dataset, the SAEs of an offline model see what
the model samples from BOS at temperature 1 (its own distribution), mixed with
packaged English prose (tvlib.prose_text). Sampling only writes token ids; the
residuals of these texts are recorded afterwards by batched prefill, as every other
text's (tvlib.residual_store).

Texts are sampled in chunks of ``batch_size``; chunk ``i`` uses its own seeded
generator, and finished chunks are kept in a cache folder named by the model's
file digests and every setting, so that a re-run (or a longer run, or one after an
interrupt) reuses them and a damaged chunk file is sampled again.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from .architectures import architecture, submodule
from .cache import CacheWarning, write_atomic
from .checks import INT, POSITIVE, POSITIVE_INT, validate
from .fingerprints import LIBRARIES, digest, folder_digest

# Bump when the sampling, the seeding or what a chunk holds changes: old chunks are then
# sampled again rather than reused.
GENERATION_FORMAT = 2


@dataclass(frozen=True)
class GenerationConfig:
    """How the texts are sampled; every field is part of the cache key."""

    n_texts: int = 1536
    n_tokens: int = 127             # tokens sampled after BOS (rows of 128 with it)
    batch_size: int = 256           # texts per chunk (sampled together)
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        validate(self, n_texts=POSITIVE_INT, n_tokens=POSITIVE_INT, batch_size=POSITIVE_INT,
                 temperature=POSITIVE, seed=INT)
        if self.n_texts % self.batch_size:
            raise ValueError(f"n_texts={self.n_texts} is not a multiple of batch_size="
                             f"{self.batch_size}: choose n_texts as a number of whole chunks")

    @property
    def n_chunks(self) -> int:
        return self.n_texts // self.batch_size


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / T), by inverting the CDF.

    torch.multinomial over a 262k-token vocabulary costs more than the model's step
    on a CPU; a cumulative sum and a binary search draw from the same distribution.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)          # (B, V)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)       # (B, 1)


@torch.no_grad()
def sample_chunk(model, tokenizer, cfg: GenerationConfig, chunk: int) -> dict[str, torch.Tensor]:
    """Chunk ``chunk``: ids (B, 1 + n_tokens) starting with BOS, and the mask (B, 1 +
    n_tokens) of the tokens to learn from: sampled tokens before the end of text, no
    special token (BOS, end of text and anything after it are left out)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + chunk)
    device = model.get_input_embeddings().weight.device
    ids = torch.full((cfg.batch_size, 1), tokenizer.bos_token_id, dtype=torch.long)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    body = submodule(model, architecture(model).body)        # the blocks and final norm
    past = None
    for _ in range(cfg.n_tokens):
        out = body(input_ids=ids[:, -1:].to(device), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = head(out.last_hidden_state[:, -1]).float().cpu()         # (B, V)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        ids = torch.cat([ids, _sample(logits, cfg.temperature, generator)], dim=1)
    ended = torch.cumsum(ids == tokenizer.eos_token_id, dim=1) > 0
    mask = ~ended & ~torch.isin(ids, torch.tensor(sorted(tokenizer.all_special_ids)))
    return {"ids": ids, "mask": mask}


def chunk_folder(model_dir: str | Path, cfg: GenerationConfig, cache_dir: Path,
                 device: str = "cpu") -> Path:
    """The cache folder of this model's texts under these settings (any n_texts), on this
    kind of device (a GPU's logits differ in the last bits: other samples)."""
    key = {"format": GENERATION_FORMAT, "model": folder_digest(Path(model_dir)),
           "device": torch.device(device).type,
           "libraries": {name: version(name) for name in LIBRARIES},
           **{k: v for k, v in asdict(cfg).items() if k != "n_texts"}}
    return Path(cache_dir) / f"generated-{digest(key)}"


def _load_chunk(path: Path, cfg: GenerationConfig) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        ok = (tensors["ids"].shape == tensors["mask"].shape == (cfg.batch_size,
                                                                cfg.n_tokens + 1))
    except Exception as error:          # truncated or garbage file: sample it again
        warnings.warn(CacheWarning(f"{path} is damaged ({error}); sampling it again"))
        return None
    if not ok:
        warnings.warn(CacheWarning(f"{path} holds tensors of other shapes; sampling it again"))
        return None
    return tensors


def generate(model_dir: str | Path, cfg: GenerationConfig, cache_dir: Path,
             device: str = "cpu", log=print) -> list[dict[str, torch.Tensor]]:
    """Every chunk of ``cfg``, sampled or read from the cache (see module docstring)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = chunk_folder(model_dir, cfg, cache_dir, device)
    folder.mkdir(parents=True, exist_ok=True)
    model = tokenizer = None
    chunks = []
    for chunk in range(cfg.n_chunks):
        path = folder / f"chunk_{chunk:04d}.safetensors"
        tensors = _load_chunk(path, cfg)
        if tensors is None:
            if model is None:
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
                model = AutoModelForCausalLM.from_pretrained(
                    model_dir, dtype=torch.float32).to(device).eval()
            tensors = sample_chunk(model, tokenizer, cfg, chunk)
            write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
            log(f"sampled chunk {chunk + 1}/{cfg.n_chunks} -> {path.name}")
        chunks.append(tensors)
    return chunks
