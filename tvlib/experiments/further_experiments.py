"""Notebook 08: the writeup's further experiments, early-layer cleanup read back at the task
layer, and word-level task vectors on whole sentences."""

from __future__ import annotations

import pandas as pd
import torch

from ..cache import cached_table
from ..checks import POSITIVE_INT, check, check_config
from ..cleanup import CleanupConfig
from ..early_layer import compare_encodings, encode, read_through
from ..fingerprints import digest
from ..interventions import Steering
from ..models import check_layers
from ..result_keys import result_key
from ..saes import SAEShelf
from ..sae_views import decode
from ..scoring import score
from ..sentences import SENTENCE_TOKENS, load_sentences, sentence_batches
from ..taskvec import task_vectors
from .cleanup_sweeps import earliest_effective_layer, run_cleanup_sweep
from .prompt_setup import PromptConfig, build_task_prompts, model_tasks, prompt_config
from .runner import cleanup_settings, run_per_task
from .schema import CLEANED, TV, ZERO_SHOT

READS = ("cleaned early TV", "early TV", "no vector")    # what enters at the early layer


def early_layer_from(earliest: pd.Series, candidates) -> int:
    """The layer to clean at: the earliest where the cleaned TV works for every task (the
    largest of the tasks' earliest layers, ``earliest_effective_layer``'s), else the last
    of ``candidates`` (the layers with an SAE before the task layer)."""
    candidates = sorted(candidates)
    if not candidates:
        raise ValueError("no layer with an SAE before the task layer to clean at: pass "
                         "early_layer explicitly, or a later task layer")
    working = [layer for layer in earliest.tolist() if layer is not None and not pd.isna(layer)]
    if earliest.empty or len(working) < len(earliest):
        return candidates[-1]
    return int(max(working))


def choose_early_layer(lm, tasks, task_layer: int, prompt_cfg: PromptConfig | None = None,
                       cfg: CleanupConfig = CleanupConfig(), batch_size: int = 32
                       ) -> tuple[int, pd.Series]:
    """(early layer, each task's earliest working layer): notebook 04's cleanup sweep (from
    its cache when the settings match) over the layers with an SAE before ``task_layer``,
    read by ``early_layer_from``."""
    candidates = [layer for layer in lm.preset.resid_pre_layers_with_sae() if layer < task_layer]
    if not candidates:
        return early_layer_from(pd.Series(dtype=object), candidates), pd.Series(dtype=object)
    scores = run_cleanup_sweep(lm, tasks, candidates, prompt_cfg, cfg, batch_size)["scores"]
    earliest = earliest_effective_layer(scores, TV, CLEANED, ZERO_SHOT)
    return early_layer_from(earliest, candidates), earliest


def cleaned_weights(features: pd.DataFrame, task: str, layer: int, n_features: int
                    ) -> torch.Tensor:
    """The cleanup's weights (F,) of ``task`` at ``layer``, rebuilt from a cleanup sweep's
    "features" table (it holds every feature active at the start; the others stay 0)."""
    rows = features[(features.task == task) & (features.layer == layer)]
    if rows.empty:
        raise ValueError(f"no cleanup of task {task!r} at layer {layer} in the table")
    weights = torch.zeros(n_features)
    weights[torch.tensor(rows.feature.to_numpy())] = torch.tensor(
        rows.cleaned_weight.to_numpy(), dtype=torch.float32)
    return weights


def run_early_layer(lm, tasks, early_layer: int, task_layer: int,
                    prompt_cfg: PromptConfig | None = None, cfg: CleanupConfig = CleanupConfig(),
                    k: int = 20, batch_size: int = 32, refresh: bool = False) -> pd.DataFrame:
    """For each task: the TV cleaned at ``early_layer`` (notebook 04's cleanup, read from its
    cache), added there at the separator of the zero-shot prompts, the residual read at
    ``task_layer`` at that token and encoded by that layer's SAE, compared with the SAE
    encoding of the plain TV of ``task_layer`` (``early_layer.compare_encodings``); beside
    it the same read with the uncleaned early TV, and with no vector. Task features: those
    the cleanup keeps at ``task_layer``. One row per (task, read), and one for the TV itself.
    """
    prompt_cfg = prompt_cfg or prompt_config(lm)
    check_config("cfg", cfg, CleanupConfig)
    early_layer, task_layer = check_layers(lm, [early_layer, task_layer])
    if early_layer >= task_layer:
        raise ValueError(f"early_layer={early_layer} is not before task_layer={task_layer}: "
                         "clean at an earlier layer than the one read")
    check("k", k, POSITIVE_INT, "pass e.g. k=20")
    layers = [early_layer, task_layer]
    cleaned = run_cleanup_sweep(lm, tasks, layers, prompt_cfg, cfg, batch_size)["features"]
    saes = SAEShelf(lm.preset)

    def compute(prompts):
        name = prompts.task.name
        tv_early, tv_task = task_vectors(lm, prompts.few_shot, layers, batch_size=batch_size)
        sae_early, sae_task = saes[early_layer], saes[task_layer]
        n_early = int(sae_early.cfg.d_sae)
        vectors = {"cleaned early TV": decode(sae_early, cleaned_weights(
                       cleaned, name, early_layer, n_early)),
                   "early TV": tv_early, "no vector": None}
        task_features = cleaned_weights(cleaned, name, task_layer, int(sae_task.cfg.d_sae))
        task_features = task_features.nonzero().flatten().tolist()
        reference = encode(sae_task, task_layer, tv_task)
        rows = [{"task": name, "read": f"TV of layer {task_layer}",
                 **compare_encodings(reference, reference, task_features, k)}]
        for read, vector in vectors.items():
            steering = None if vector is None else Steering(early_layer, vector)
            residual = read_through(lm, prompts.zero_shot, steering, task_layer, batch_size)
            rows.append({"task": name, "read": read, **compare_encodings(
                encode(sae_task, task_layer, residual), reference, task_features, k)})
        return pd.DataFrame(rows).assign(early_layer=early_layer, task_layer=task_layer, k=k,
                                         n_task_features=len(task_features))

    return run_per_task("early_layer", lm, tasks, prompt_cfg,
                        {"early_layer": early_layer, "task_layer": task_layer, "k": k,
                         "cleanup": cleanup_settings(cfg)}, compute, refresh,
                        sae_layers=layers)


def run_sentence_transfer(lm, word_tasks, layer: int, prompt_cfg: PromptConfig | None = None,
                          cfg: CleanupConfig = CleanupConfig(), n_shots: int = 3,
                          n_tokens: int = SENTENCE_TOKENS, batch_size: int = 16,
                          refresh: bool = False) -> pd.DataFrame:
    """Sentence translation (``tvlib.sentences``) zero-shot, with the word-level TV of
    ``layer`` added at the separator, with its cleaned version (notebook 04's cleanup, read
    from its cache), and with ``n_shots`` sentence demonstrations (sentence ICL). NLL
    summed over every token of the target sentence, and per token; one row per (task,
    condition)."""
    prompt_cfg = prompt_cfg or prompt_config(lm)
    check_config("cfg", cfg, CleanupConfig)
    check_layers(lm, [layer])
    check("n_shots", n_shots, POSITIVE_INT, "pass e.g. n_shots=3")
    loaded = model_tasks(lm, word_tasks)
    cleaned = run_cleanup_sweep(lm, list(loaded.values()), [layer], prompt_cfg, cfg,
                                batch_size)["features"]
    sae = SAEShelf(lm.preset)[layer]
    rows = []
    for name, task in loaded.items():
        sentences = load_sentences(name)
        key = result_key("sentence_transfer", lm, [layer], task=digest(task),
                         sentences=digest(sentences), prompts=prompt_cfg,
                         cleanup=cleanup_settings(cfg), layer=layer, n_shots=n_shots,
                         n_tokens=n_tokens)

        def compute(name=name, task=task, sentences=sentences):
            batches = sentence_batches(lm.tokenizer, sentences, prompt_cfg.fmt, n_shots,
                                       prompt_cfg.seed, n_tokens)
            words = build_task_prompts(lm.tokenizer, task, prompt_cfg)
            tv = task_vectors(lm, words.few_shot, [layer], batch_size=batch_size)[0]
            clean = decode(sae, cleaned_weights(cleaned, name, layer, int(sae.cfg.d_sae)))
            zero = batches["zero_shot"]
            runs = {"zero-shot": (zero, None), "word TV": (zero, Steering(layer, tv)),
                    "cleaned word TV": (zero, Steering(layer, clean)),
                    f"sentence ICL ({n_shots} shots)": (batches["icl"], None)}
            out = []
            for condition, (batch, steering) in runs.items():
                nll = score(lm, batch, steering, batch_size).nll
                tokens = (batch.target_pos >= 0).sum(-1).float()
                out.append({"task": name, "condition": condition, "nll": float(nll.mean()),
                            "nll_per_token": float((nll / tokens).mean()),
                            "tokens": float(tokens.mean()), "n_prompts": len(batch),
                            "layer": layer})
            return pd.DataFrame(out)

        rows.append(cached_table(key, compute, refresh=refresh))
    return pd.concat(rows, ignore_index=True)
