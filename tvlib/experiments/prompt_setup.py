"""A task's prompts for every experiment: pairs split once into demonstrations,
training and evaluation prompts (``PromptConfig``, ``build_task_prompts``)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from ..checks import INT, POSITIVE_INT, Rule, check, one_of, validate
from ..detectors import detector_prompts
from ..models import as_model, check_layers
from ..prompt_batch import PromptBatch, tokenize_prompts
from ..prompts import FORMAT_NAMES, few_shot_prompts, zero_shot_prompts
from ..tasks import Task, TaskDataError, load_task


@dataclass(frozen=True)
class PromptConfig:
    """How a task's pairs become few-shot and evaluation prompts."""

    n_prompts: int = 16        # few-shot prompts for the task vector and ICL
    n_shots: int = 8           # demonstrations per few-shot prompt
    n_eval: int = 50           # zero-shot evaluation prompts (pairs held apart)
    n_train: int = 24          # zero-shot prompts that cleanup optimises on (from the pool)
    fmt: str = "authors"
    n_first: int = 2           # answer tokens scored
    seed: int = 0

    def __post_init__(self):
        validate(self, n_prompts=POSITIVE_INT, n_eval=POSITIVE_INT, n_train=POSITIVE_INT,
                 n_first=POSITIVE_INT, fmt=one_of(FORMAT_NAMES), seed=INT)
        # zero-shot prompts are built apart: a task vector needs demonstrations
        check("PromptConfig.n_shots", self.n_shots,
              Rule(POSITIVE_INT.holds, POSITIVE_INT.text + " (a task vector needs "
                   "demonstrations; zero-shot prompts are built separately)"),
              "pass e.g. n_shots=8")


def configure(default, **settings):
    """``default`` (a frozen config) with every setting that is not None: notebooks leave
    a parameter at None to use tvlib's default, which lives in one place."""
    return replace(default, **{k: v for k, v in settings.items() if v is not None})


def prompt_config(lm, **settings) -> PromptConfig:
    """``PromptConfig`` with the model preset's defaults (its n_shots) and ``settings``."""
    return configure(PromptConfig(n_shots=as_model(lm).preset.n_shots), **settings)


@dataclass
class TaskPrompts:
    task: Task
    few_shot: PromptBatch      # demonstrations + query, answer appended
    zero_shot: PromptBatch     # evaluation pairs, answer appended
    train: PromptBatch         # zero-shot prompts for optimisation, disjoint from evaluation
    detector_eval: PromptBatch   # one-shot "X -> Y" prompts on the evaluation pairs
    detector_train: PromptBatch  # the same on the optimisation pairs


def model_tasks(lm, tasks) -> dict[str, Task]:
    """Tasks by name or path, or as loaded ``Task`` objects (e.g. ``load_task(path,
    duplicates="first")``), keeping only the pairs the model's preset knows (all,
    for real models)."""
    if isinstance(tasks, (str, Path, Task)) or not hasattr(tasks, "__iter__"):
        raise TaskDataError(f"tasks must be a list, e.g. ['antonyms'], not {tasks!r}")
    tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    if not tasks:
        raise TaskDataError("no tasks given: pass at least one task name, e.g. ['antonyms']")
    by_name = {}
    for task in tasks:
        if task.name in by_name:
            raise TaskDataError(f"task {task.name!r} is given twice: list each task once")
        by_name[task.name] = task.head(as_model(lm).preset.max_pairs_per_task)
    return by_name


def layers_with_sae(lm, layers) -> list[int]:
    """``layers`` checked to have an SAE; None: every resid_pre layer with one."""
    available = list(as_model(lm).preset.resid_pre_layers_with_sae())
    if layers is None:
        return available
    layers = check_layers(lm, layers)
    missing = [layer for layer in layers if layer not in available]
    if missing:
        raise ValueError(f"preset {lm.preset.name!r} has no SAE at resid_pre layers {missing}; "
                         f"SAEs exist at {available}")
    return layers


def split_eval(task: Task, cfg: PromptConfig) -> tuple[list, list]:
    """(pool, eval_pairs): evaluation pairs never serve as demonstrations or queries."""
    pairs = list(task.pairs)
    random.Random(f"eval-split-{task.name}-{cfg.seed}").shuffle(pairs)
    pool = len(pairs) - cfg.n_eval
    if pool < max(cfg.n_shots + 1, cfg.n_train):
        raise TaskDataError(
            f"task {task.name!r} has {len(pairs)} pairs: n_eval={cfg.n_eval} evaluation pairs "
            f"leave {pool}, fewer than the {max(cfg.n_shots + 1, cfg.n_train)} needed for "
            f"n_shots={cfg.n_shots} demonstrations plus a query and n_train={cfg.n_train} "
            "training prompts; lower n_eval, n_shots or n_train")
    return pairs[cfg.n_eval:], pairs[:cfg.n_eval]


def build_task_prompts(tokenizer, task: Task, cfg: PromptConfig) -> TaskPrompts:
    pool, eval_pairs = split_eval(task, cfg)
    # An input with several outputs (peers' files) stays on the evaluation side only.
    held_out = {x for x, _ in eval_pairs}
    pool = [pair for pair in pool if pair[0] not in held_out]
    if len(pool) < max(cfg.n_shots + 1, cfg.n_train):
        raise TaskDataError(
            f"task {task.name!r}: {len(pool)} pairs are left for demonstrations once inputs "
            f"shared with evaluation pairs are set aside, fewer than n_shots + 1 = "
            f"{cfg.n_shots + 1} or n_train = {cfg.n_train}; "
            "lower n_eval, n_shots or n_train, or load the task with duplicates='first'")
    few = few_shot_prompts(task, cfg.n_prompts, cfg.n_shots, cfg.seed, cfg.fmt,
                           queries=pool, demo_pool=pool)
    zero = zero_shot_prompts(eval_pairs, cfg.fmt, task=task)
    train = zero_shot_prompts(pool[:cfg.n_train], cfg.fmt, task=task)
    detector_eval = detector_prompts(eval_pairs, cfg.fmt, task=task)
    detector_train = detector_prompts(pool[:cfg.n_train], cfg.fmt, task=task)
    return TaskPrompts(task, *(tokenize_prompts(tokenizer, p, cfg.n_first)
                               for p in (few, zero, train, detector_eval, detector_train)))
