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

Sampling is slow on a CPU (85-130 tokens/s for Gemma 3 270M on 2 cores, most of it the
262k-word unembedding), so the chunks a build used can be shipped beside its SAEs (``ship``): a
folder of chunk files and a record holding the model's file digests, the settings and
each file's SHA-256. ``generate`` reads a shipped chunk instead of sampling it when the
record is for this model and these settings and the file matches its SHA-256; sampling
adds to the shipped texts over several runs, and builds on other machines read the
same texts (a CPU's rounding would otherwise draw others).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from .architectures import architecture, submodule
from .cache import CacheWarning, write_atomic
from .checks import INT, POSITIVE, POSITIVE_INT, validate
from .fingerprints import LIBRARIES, digest, file_digest, folder_digest
from .gguf_model import RECORD_NAME as CONVERSION_RECORD

# Bump when the sampling, the seeding or what a chunk holds changes: old chunks are then
# sampled again rather than reused.
GENERATION_FORMAT = 2
SHIPPED_RECORD = "generated.json"


@dataclass(frozen=True)
class GenerationConfig:
    """How the texts are sampled; every field is part of the cache key."""

    n_texts: int = 7680             # as many as ship in data/gemma-3-270m/generated
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
    The uniforms come from the CPU ``generator``; the rest runs where the logits are
    (on a GPU, moving (B, 262k) logits to the CPU each step costs more than the step).
    Returns (B, 1) ids on the CPU.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)          # (B, V)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1).cpu()  # (B, 1)


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
        logits = head(out.last_hidden_state[:, -1]).float()               # (B, V)
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
    if torch.device(device).type != "cpu":
        key["sampler"] = 2      # off the CPU the draw moved to the device: other samples
    return Path(cache_dir) / f"generated-{digest(key)}"


def shipped_key(model_dir: str | Path, cfg: GenerationConfig) -> dict:
    """What shipped texts must have been sampled from and with: the model's own files (a
    converted model's record of the library versions that converted it left out) and
    every setting but the number of texts."""
    return {"format": GENERATION_FORMAT,
            "model": folder_digest(Path(model_dir), exclude=(CONVERSION_RECORD,)),
            **{k: v for k, v in asdict(cfg).items() if k != "n_texts"}}


def _chunk_name(chunk: int) -> str:
    return f"chunk_{chunk:04d}.safetensors"


def _shipped_record(folder: Path, key: dict, writing: bool = False) -> dict:
    """The record of the texts shipped in ``folder`` for ``key`` (empty when there are none).
    Texts for another model or other settings, or an unreadable record: a warning when
    reading (they are not used); an error when ``writing`` (they would be overwritten)."""
    path = Path(folder) / SHIPPED_RECORD
    if not path.is_file():
        return {"key": key, "chunks": {}}
    try:
        record = json.loads(path.read_text())
        other = record["key"]
        record["chunks"]
    except (ValueError, KeyError, TypeError) as error:
        problem = f"{path} is unreadable ({type(error).__name__}: {error})"
    else:
        if other == key:
            return record
        changed = sorted(k for k in set(key) | set(other) if key.get(k) != other.get(k))
        problem = (f"the texts shipped in {folder} were sampled with other "
                   f"{', '.join(changed)} ({ {k: other.get(k) for k in changed} } there, "
                   f"{ {k: key.get(k) for k in changed} } here)")
    if writing:
        raise ValueError(f"{problem}: shipping here would overwrite them; move that folder "
                         "away, or ship to another output folder (--out)")
    warnings.warn(CacheWarning(f"{problem}: they are not used, and the texts are sampled here"))
    return {"key": key, "chunks": {}}


def shipped_chunks(folder: str | Path | None, model_dir: str | Path,
                   cfg: GenerationConfig) -> dict[int, Path]:
    """Chunk number -> file of the texts shipped in ``folder`` for this model and these
    settings, each file checked against the SHA-256 its record holds (a missing or
    changed file is left out, with a warning, and sampled again)."""
    if folder is None:
        return {}
    folder = Path(folder)
    found = {}
    for name, entry in _shipped_record(folder, shipped_key(model_dir, cfg))["chunks"].items():
        path = folder / name
        if not path.is_file() or file_digest(path) != entry["sha256"]:
            warnings.warn(CacheWarning(
                f"{path} is missing or is not the file {SHIPPED_RECORD} records (sha256 "
                f"{entry['sha256'][:16]}...): it is sampled again"))
            continue
        found[int(name.removeprefix("chunk_").removesuffix(".safetensors"))] = path
    return found


def _load_chunk(path: Path, cfg: GenerationConfig) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        tensors["ids"] = tensors["ids"].long()          # shipped chunks hold int32
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
             device: str = "cpu", log=print, shipped: str | Path | None = None,
             on_chunk=None) -> list[dict[str, torch.Tensor]]:
    """Every chunk of ``cfg``: read from the texts shipped in ``shipped``, else from the
    cache, else sampled (see module docstring). ``on_chunk(chunk, tensors)`` is called as
    each chunk is ready."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = chunk_folder(model_dir, cfg, cache_dir, device)
    folder.mkdir(parents=True, exist_ok=True)
    from_shipped = shipped_chunks(shipped, model_dir, cfg)
    model = tokenizer = None
    chunks = []
    for chunk in range(cfg.n_chunks):
        path = folder / _chunk_name(chunk)
        tensors = _load_chunk(from_shipped[chunk], cfg) if chunk in from_shipped else None
        tensors = tensors if tensors is not None else _load_chunk(path, cfg)
        if tensors is None:
            if model is None:
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
                model = AutoModelForCausalLM.from_pretrained(
                    model_dir, dtype=torch.float32).to(device).eval()
            tensors = sample_chunk(model, tokenizer, cfg, chunk)
            write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
            log(f"sampled chunk {chunk + 1}/{cfg.n_chunks} -> {path.name}")
        if on_chunk is not None:
            on_chunk(chunk, tensors)
        chunks.append(tensors)
    return chunks


def _machine(device: str) -> str:
    """The processor that sampled (a CPU's rounding decides which texts are drawn)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def ship(model_dir: str | Path, cfg: GenerationConfig, cache_dir: Path, folder: str | Path,
         device: str = "cpu", log=print) -> list[dict[str, torch.Tensor]]:
    """Every chunk of ``cfg`` (as ``generate``), written into ``folder`` with its record
    where it is not there yet, as soon as it is ready; chunks already shipped stay as they
    are. Each chunk file is written atomically and the record after it, so an interrupt
    keeps every chunk finished before it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    key = shipped_key(model_dir, cfg)
    record = _shipped_record(folder, key, writing=True)   # refuse before sampling anything
    present = shipped_chunks(folder, model_dir, cfg)
    versions = {"torch": torch.__version__, **{name: version(name) for name in LIBRARIES}}

    def keep(chunk: int, tensors: dict[str, torch.Tensor]) -> None:
        if chunk in present:
            return
        name = _chunk_name(chunk)
        small = {"ids": tensors["ids"].to(torch.int32), "mask": tensors["mask"]}  # ids < 2**31
        write_atomic(folder / name, lambda tmp: save_file(small, str(tmp)))
        record["chunks"][name] = {"sha256": file_digest(folder / name),
                                  "tokens": int(tensors["mask"].sum()),
                                  "sampled_on": {"processor": _machine(device),
                                                 "device": torch.device(device).type,
                                                 "versions": versions}}
        record["chunks"] = dict(sorted(record["chunks"].items()))
        record["texts"] = len(record["chunks"]) * cfg.batch_size
        record["tokens"] = sum(entry["tokens"] for entry in record["chunks"].values())
        text = json.dumps(record, indent=1) + "\n"
        write_atomic(folder / SHIPPED_RECORD, lambda tmp: tmp.write_text(text))
        log(f"shipped {name} to {folder}")

    return generate(model_dir, cfg, cache_dir, device, log, shipped=folder, on_chunk=keep)
