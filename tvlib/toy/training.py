"""Training the embedded model and its SAEs, and moving them into ``data/toy/``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..models import load_model
from ..paths import TOY_DIR
from ..presets import get_preset
from ..sae_training import SAETrainingConfig, save_sae, text_residuals, train_sae
from .data import ToyConfig, generate_documents, write_corpus
from .tokenizer import build_tokenizer, vocabulary_texts


def build_model(cfg: ToyConfig, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, max_position_embeddings=4 * cfg.context,
        rope_theta=10000.0, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def pack(tokenizer, docs: list[str], context: int) -> torch.Tensor:
    """Concatenate tokenised documents (each starts with BOS) into rows of ``context``."""
    ids = [i for row in tokenizer(docs)["input_ids"] for i in row]
    n_rows = len(ids) // context
    return torch.tensor(ids[: n_rows * context]).view(n_rows, context)


def train_model(cfg: ToyConfig, out_dir: Path, log=print) -> dict:
    """Train tokenizer and model into ``out_dir``; return training statistics."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()
    tokenizer = build_tokenizer(vocabulary_texts(cfg))
    tokens_per_doc = 40  # rough; documents are drawn until the token budget is met
    docs = generate_documents(cfg, cfg.train_tokens // tokens_per_doc, cfg.seed)
    rows = pack(tokenizer, docs, cfg.context)
    n_steps = len(rows) // cfg.batch_size
    log(f"vocab {len(tokenizer)}, {rows.numel():,} tokens, {n_steps} steps")

    model = build_model(cfg, len(tokenizer), tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, n_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(rows), generator=generator)
    losses = []
    for step in range(n_steps):
        batch = rows[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]  # (B, T)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == n_steps - 1:
            log(f"step {step:5d}/{n_steps}  loss {sum(losses[-100:]) / len(losses[-100:]):.3f}"
                f"  {time.time() - start:.0f}s")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"train_tokens": int(rows.numel()), "steps": n_steps,
            "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "seconds": round(time.time() - start, 1), "vocab_size": len(tokenizer)}


# ---------------------------------------------------------------- SAEs

def sae_training_config(cfg: ToyConfig, layer: int) -> SAETrainingConfig:
    """The training settings of the SAE at resid_pre ``layer`` (seed: base + layer)."""
    return SAETrainingConfig(
        architecture=cfg.sae_architecture, width=cfg.d_model * cfg.sae_expansion,
        l1_coefficient=cfg.sae_l1_coefficient, lr=cfg.sae_lr, batch_tokens=cfg.sae_batch_tokens,
        epochs=cfg.sae_epochs, seed=cfg.seed + cfg.sae_seed_offset + layer,
        save_dtype="float32")


def fresh_text(cfg: ToyConfig, tokenizer, n_tokens: int, seed: int) -> torch.Tensor:
    """(n_tokens // context, context) packed ids of new documents from the training mix."""
    docs = generate_documents(cfg, int(1.3 * n_tokens) // 40, seed)  # ~40 tokens a document
    rows = pack(tokenizer, docs, cfg.context)
    if rows.numel() < n_tokens - cfg.context:
        raise ValueError(f"{rows.numel()} tokens of documents are fewer than the {n_tokens} "
                         "asked for")
    return rows[: n_tokens // cfg.context]


def toy_preset(root: Path):
    """The toy preset reading the model and SAEs under ``root`` (a scratch or shipped folder)."""
    return dataclasses.replace(get_preset("toy"), model_id=str(root / "model"),
                               sae_dir=str(root / "saes"))


def train_saes(cfg: ToyConfig, root: Path, log=print, layers=None) -> dict:
    """One SAE per layer at resid_pre of the model in ``root/model``, into ``root/saes``,
    trained on the residuals of fresh text from the training mix (tvlib.sae_training)."""
    lm = load_model(toy_preset(root), device="cpu")
    layers = list(cfg.sae_layers if layers is None else layers)
    ids = fresh_text(cfg, lm.tokenizer, cfg.sae_train_tokens, cfg.seed + cfg.sae_seed_offset)
    resid = text_residuals(lm, ids, layers)                     # {layer: (N, d)}
    stats = {}
    for layer in layers:
        start = time.time()
        training = sae_training_config(cfg, layer)
        sae = train_sae(resid[layer], f"model.layers.{layer}.input", training, log=log)
        meta = sae.cfg.metadata             # the site, also as fields, as the card reports it
        meta.model_name, meta.site, meta.layer = "toy", "resid_pre", layer
        save_sae(sae, root / "saes" / f"layer_{layer}", training.save_dtype)
        stats[layer] = {"seconds": round(time.time() - start, 1), "seed": training.seed,
                        "train_tokens": int(resid[layer].shape[0])}
        log(f"SAE layer {layer}: {stats[layer]['seconds']}s")
    return stats


# ---------------------------------------------------------------- all of it

def train_all(cfg: ToyConfig, out_dir: Path = TOY_DIR, skip_model: bool = False) -> None:
    """Retrain model and SAEs into a scratch folder, then move into place atomically."""
    out_dir = Path(out_dir)
    scratch = Path(tempfile.mkdtemp(prefix="toy-", dir=out_dir.parent))
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    try:
        start = time.time()
        if skip_model:
            shutil.copytree(out_dir / "model", scratch / "model")
            model_stats = json.loads((out_dir / "training.json").read_text())["model"]
        else:
            model_stats = train_model(cfg, scratch / "model", log)
        sae_stats = train_saes(cfg, scratch, log)
        write_corpus(cfg, scratch / "corpus.json")
        record = {"config": asdict(cfg), "model": model_stats, "saes": sae_stats,
                  "total_seconds": round(time.time() - start, 1),
                  "torch_threads": torch.get_num_threads()}
        (scratch / "training.json").write_text(json.dumps(record, indent=2))
        (scratch / "training.log").write_text("\n".join(log_lines) + "\n")
        backup = out_dir.with_name(out_dir.name + "-previous")
        if out_dir.exists():
            out_dir.rename(backup)          # the old files survive until the new ones are in
        scratch.rename(out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
