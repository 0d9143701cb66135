"""What the embedded model is trained on: few-shot documents in three formats and fact
sentences, generated from the task files and a seed (``ToyConfig``)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..prompts import TOY_FORMATS, render
from ..tasks import ALGORITHMIC_TASKS, ALL_TASKS, LIST_PICKS, Task, load_task, random_list_pair

# One fact sentence per task: how pairs are stated outside the x -> y form.
FACT_TEMPLATES = {
    "antonyms": "the opposite of {x} is {y}",
    "country_capital": "the capital of {x} is {y}",
    "football_player_position": "{x} plays as a {y}",
    "location_continent": "{x} is on the continent of {y}",
    "location_country": "{x} is in the country of {y}",
    "location_language": "people in {x} speak {y}",
    "location_religion": "{x} is a holy place of {y}",
    "person_language": "the native language of {x} is {y}",
    "person_profession": "{x} worked as a {y}",
    "plural_singular": "there are many {x} but only one {y}",
    "singular_plural": "there is one {x} and there are many {y}",
    "present_simple_gerund": "i {x} every day and i am {y} now",
    "present_simple_past_perfect": "i {x} every day and i have {y} before",
    "present_simple_past_simple": "i {x} every day and i {y} yesterday",
    "en_es": "the spanish word for {x} is {y}",
    "en_fr": "the french word for {x} is {y}",
    "en_it": "the italian word for {x} is {y}",
    "es_en": "the spanish word {x} means {y} in english",
    "fr_en": "the french word {x} means {y} in english",
    "it_en": "the italian word {x} means {y} in english",
    "num_plus_1": "{x} plus one is {y}",
    "num_minus_1": "{x} minus one is {y}",
    "num_plus_2": "{x} plus two is {y}",
}
# List tasks have no facts: in training their lists are drawn afresh for every
# document (so the rule must be learned, not the lists memorised), never a held-out one.


@dataclass(frozen=True)
class ToyConfig:
    """Everything that determines the embedded model; saved beside it."""

    seed: int = 0
    tasks: tuple[str, ...] = ALL_TASKS
    max_pairs_per_task: int = 100
    heldout_fraction: float = 0.2       # pairs seen only in fact sentences
    # model (LlamaConfig)
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    d_mlp: int = 512
    context: int = 128
    # training
    train_tokens: int = 8_000_000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    fact_fraction: float = 0.3          # share of documents that are fact sentences
    max_demos: int = 10
    algorithmic_weight: float = 3.0     # sampling weight of generated tasks (others 1)
    format_weights: tuple[tuple[str, float], ...] = (("authors", 0.6), ("hendel", 0.2),
                                                     ("todd", 0.2))
    facts_per_document: int = 6
    # SAEs, one per layer at resid_pre (tvlib.sae_training, as the offline Gemma's)
    sae_architecture: str = "gated"
    sae_expansion: int = 8
    sae_l1_coefficient: float = 4.0
    sae_lr: float = 1e-3
    sae_train_tokens: int = 500_000     # fresh tokens recorded (special tokens left out)
    sae_batch_tokens: int = 2048
    sae_epochs: int = 2
    sae_seed_offset: int = 1000         # SAE data uses seed + this, unseen by the model
    corpus_seed_offset: int = 3000      # the shipped feature-reading corpus

    @property
    def sae_layers(self) -> tuple[int, ...]:
        return tuple(range(self.n_layers))


# ---------------------------------------------------------------- pairs and splits

def toy_tasks(cfg: ToyConfig) -> dict[str, Task]:
    return {name: load_task(name).head(cfg.max_pairs_per_task) for name in cfg.tasks}


def is_heldout(x: str, cfg: ToyConfig) -> bool:
    """Whether input ``x`` is held out of the ``x -> y`` form, for every task that has it.

    Keyed by the input alone, so a held-out input of one task (``66`` in n+1)
    is never seen as a demonstration of another (``66 -> 65`` in n-1).
    """
    digest = hashlib.sha256(f"heldout-{cfg.seed}-{x}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < cfg.heldout_fraction


def split_pairs(task: Task, cfg: ToyConfig) -> tuple[list, list]:
    """(icl_pairs, heldout_pairs): held-out pairs never appear as ``x -> y`` in training.

    For list tasks the held-out pairs appear nowhere at all (the rule is
    algorithmic); for the others they appear only in fact sentences.
    """
    icl, heldout = [], []
    for pair in task.pairs:
        (heldout if is_heldout(pair[0], cfg) else icl).append(pair)
    return icl, heldout


# ---------------------------------------------------------------- training text

def fresh_list_pairs(rng: random.Random, name: str, n: int, cfg: ToyConfig) -> list:
    """``n`` distinct random lists for list task ``name``, none of them held out."""
    pairs: dict[str, str] = {}
    while len(pairs) < n:
        x, y = random_list_pair(rng, name)
        if not is_heldout(x, cfg):
            pairs[x] = y
    return list(pairs.items())


def few_shot_document(rng: random.Random, task: Task, icl_pairs: list, cfg: ToyConfig) -> str:
    names, weights = zip(*cfg.format_weights)
    fmt = TOY_FORMATS[rng.choices(names, weights)[0]]
    k = rng.randint(0, cfg.max_demos)
    if task.name in LIST_PICKS:
        chosen = fresh_list_pairs(rng, task.name, k + 1, cfg)
    else:
        chosen = rng.sample(icl_pairs, min(k + 1, len(icl_pairs)))
    (x, y), demos = chosen[0], chosen[1:]
    return render(fmt, demos, x, y).text


def fact_document(rng: random.Random, facts: list[tuple[str, str, str]], cfg: ToyConfig) -> str:
    lines = []
    for _ in range(cfg.facts_per_document):
        name, x, y = rng.choice(facts)
        lines.append(FACT_TEMPLATES[name].format(x=x, y=y))
    return "\n".join(lines)


def generate_documents(cfg: ToyConfig, n_documents: int, seed: int) -> list[str]:
    """Training text: few-shot sequences (one task each) and fact documents."""
    rng = random.Random(f"documents-{seed}")
    tasks = toy_tasks(cfg)
    icl = {name: split_pairs(task, cfg)[0] for name, task in tasks.items()}
    facts = [(name, x, y) for name, task in tasks.items() if name in FACT_TEMPLATES
             for x, y in task.pairs]
    names = list(tasks)
    weights = [cfg.algorithmic_weight if n in ALGORITHMIC_TASKS else 1.0 for n in names]
    docs = []
    for _ in range(n_documents):
        if rng.random() < cfg.fact_fraction:
            docs.append(fact_document(rng, facts, cfg))
        else:
            name = rng.choices(names, weights)[0]
            docs.append(few_shot_document(rng, tasks[name], icl[name], cfg))
    return docs


def write_corpus(cfg: ToyConfig, path: Path, n_documents: int = 400) -> None:
    """The text corpus shipped for reading features: unseen documents of the training mix."""
    docs = generate_documents(cfg, n_documents, cfg.seed + cfg.corpus_seed_offset)
    path.write_text(json.dumps(docs, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
