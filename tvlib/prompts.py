"""Few-shot and zero-shot prompts in the authors', Hendel's and Todd's formats.

A prompt is rendered as text while the character span of every separator and
every answer is recorded; ``prompt_batch.tokenize_prompts`` maps those spans to
token positions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .tasks import TASK_FAMILIES, Task, TaskDataError


@dataclass(frozen=True)
class PromptFormat:
    """How one (input, output) pair is written.

    The separator is the last token of ``query``: the token that precedes the
    answer and where task vectors are read and steered.
    """

    name: str
    instruction: str   # text before the first pair
    query: str         # template for the input part, ends with the separator
    answer: str        # template for the output part
    joiner: str        # between consecutive pairs
    # Hendel et al.: a space goes before every input and output unless the task's
    # family is listed here; None: the format adds no such space.
    unspaced_families: tuple[str, ...] | None = None
    bos: bool = False  # Todd et al.: prepend the BOS token when the tokenizer adds none

    def space(self, family: str | None) -> str:
        """The text put before each input and output for a task of ``family``."""
        if self.unspaced_families is None or family in self.unspaced_families:
            return ""
        return " "


FORMATS = {
    # The writeup's authors: "Follow the pattern:\nx1 -> y1\nx2 -> y2\n...\nxq ->"
    "authors": PromptFormat("authors", "Follow the pattern:\n", "{x} ->", " {y}", "\n"),
    # Hendel et al., icl_task_vectors core/data/datasets/few_shot_format.py:
    # "example:{input}->{output}" joined by "\n", query "example:{input}->". Their
    # core/data/tasks/mapping_task.py gives linguistic and translation tasks (MappingTask's
    # default) a leading space on input and output (when it keeps 70% of outputs single
    # tokens, as for their models); knowledge tasks (allow_prefix=True) and algorithmic
    # tasks get none. A task of no known family gets the space (MappingTask's default).
    # Their filter to single-token outputs is not applied here.
    "hendel": PromptFormat("hendel", "", "example:{x}->", "{y}", "\n",
                           unspaced_families=("knowledge", "algorithmic")),
    # Todd et al., function_vectors src/utils/prompt_utils.py (word_pairs_to_prompt_data,
    # create_prompt): "Q:" + " x" + "\n" + "A:" + " y" + "\n\n" per example, query
    # "Q: x\nA:", and "<|endoftext|>" first when the model's tokenizer adds no BOS.
    "todd": PromptFormat("todd", "", "Q: {x}\nA:", " {y}", "\n\n", bos=True),
}

# What the embedded model was trained on (tvlib/toy/data.py): the authors' format and
# simplified forms of the peers' formats. Not the peers' formats; kept so that
# retraining reproduces the shipped model.
TOY_FORMATS = {
    "authors": FORMATS["authors"],
    "hendel": PromptFormat("toy_hendel", "", "{x}->", "{y}", "\n"),
    "todd": PromptFormat("toy_todd", "", "Q:{x}\nA:", "{y}", "\n\n"),
}
_NAMED = {**FORMATS, "toy_hendel": TOY_FORMATS["hendel"], "toy_todd": TOY_FORMATS["todd"]}
FORMAT_NAMES = tuple(sorted(_NAMED))       # what a config may name

_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"   # what str.splitlines() splits on


def get_format(fmt: PromptFormat | str) -> PromptFormat:
    """A format by name (``FORMATS``, or "toy_hendel" / "toy_todd"), or ``fmt`` itself."""
    if isinstance(fmt, PromptFormat):
        return fmt
    try:
        return _NAMED[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prompt format {fmt!r}; choose one of {list(FORMAT_NAMES)}") from None


@dataclass(frozen=True)
class Prompt:
    """Prompt text with the character spans that matter.

    Spans are (start, end) with end exclusive. ``separators``, ``answers``,
    ``pairs`` and ``inputs`` list the demonstrations first, then the query;
    the query's answer span is present only when the answer is written into the
    text (teacher forcing).
    """

    text: str
    separators: tuple[tuple[int, int], ...]
    answers: tuple[tuple[int, int], ...]     # demonstrations' answers, then the query's
    n_demos: int
    target: str                              # the query's expected output
    steer: tuple[int, int]                   # span of the token to steer
    task: str                                # the task's name ("" if unnamed), for errors
    pairs: tuple[tuple[str, str], ...]       # (input, output) as given, the query's last
    inputs: tuple[tuple[int, int], ...]      # span of each pair's input
    bos: bool                                # prepend BOS when the tokenizer adds none


def task_label(task: str) -> str:
    return f"task {task!r}" if task else "a prompt of an unnamed task"


def _check_pair(fmt: PromptFormat, task: str, pair) -> tuple[str, str]:
    """``pair`` as (input, output), refused if rendering it would change the prompt's lines."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TaskDataError(f"{task_label(task)}: {pair!r} is not an (input, output) pair")
    for role, value in zip(("input", "output"), pair):
        if not isinstance(value, str) or not value.strip():
            raise TaskDataError(f"{task_label(task)}: the {role} of pair {tuple(pair)!r} must be a "
                                "non-empty string; drop the pair")
        if any(c in value for c in _LINE_BREAKS) or (fmt.joiner and fmt.joiner in value):
            raise TaskDataError(
                f"{task_label(task)}: the {role} of pair {tuple(pair)!r} holds a line break or the "
                f"{fmt.name!r} format's joiner {fmt.joiner!r}, which would add a line to the "
                f"prompt; remove it from the {role} or drop the pair")
    return tuple(pair)


def render(fmt: PromptFormat, demos: Sequence[tuple[str, str]], query: str,
           target: str, with_answer: bool = True, steer_at: str = "separator",
           task: str = "", family: str | None = None) -> Prompt:
    """Write demos and a query in ``fmt``; record spans as the text grows.

    ``steer_at`` is "separator" (the query's separator) or "first_answer" (the
    first demonstration's answer, i.e. ``Y`` in detector prompts). ``task`` names
    the task in errors; ``family`` picks the Hendel format's leading space.
    """
    pairs = [_check_pair(fmt, task, p) for p in [*demos, (query, target)]]
    space = fmt.space(family)
    text = fmt.instruction
    separators, answers, inputs = [], [], []
    before_x = len(fmt.query.split("{x}")[0].format())   # query text before the input
    for i, (x, y) in enumerate(pairs):
        if i:
            text += fmt.joiner
        inputs.append((len(text) + before_x, len(text) + before_x + len(space + x)))
        text += fmt.query.format(x=space + x)
        separators.append((len(text) - 1, len(text)))   # the query's last character
        is_query = i == len(demos)
        if not is_query or with_answer:
            answer_start = len(text)
            text += fmt.answer.format(y=space + y)
            answers.append((answer_start, len(text)))
    if steer_at == "separator":
        steer = separators[-1]
    elif steer_at == "first_answer":
        if not demos:
            raise ValueError("steer_at='first_answer' needs at least one demonstration")
        steer = answers[0]
    else:
        raise ValueError(f"steer_at must be 'separator' or 'first_answer', not {steer_at!r}")
    return Prompt(text, tuple(separators), tuple(answers), len(demos), target, steer,
                  task, tuple(pairs), tuple(inputs), fmt.bos)


def check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TaskDataError(f"{name} must be an integer >= {minimum}, got {value!r}; "
                            f"pass e.g. {name}={max(minimum, 1)}")
    return value


def _task_and_pairs(pairs, task) -> tuple[str, str | None, list]:
    """(name, family, pairs) from ``pairs`` (or a Task) and ``task`` (a Task, name or None)."""
    if isinstance(pairs, Task):
        task, pairs = task if task is not None else pairs, pairs.pairs
    if isinstance(task, Task):
        name, family = task.name, task.family
    elif isinstance(task, str) or task is None:
        name, family = task or "", TASK_FAMILIES.get(task or "")
    else:
        raise TaskDataError(f"task must be a Task, a task name or None, got {task!r}")
    if isinstance(pairs, str) or not isinstance(pairs, Sequence):
        raise TaskDataError(f"{task_label(name)}: pairs must be a list of (input, output) pairs "
                            f"or a Task, got {pairs!r}")
    if not pairs:
        raise TaskDataError(f"{task_label(name)}: no pairs given to build prompts from")
    return name, family, list(pairs)


def few_shot_prompts(task: Task, n_prompts: int, n_shots: int, seed: int,
                     fmt: PromptFormat | str = "authors",
                     queries: Sequence[tuple[str, str]] | None = None,
                     demo_pool: Sequence[tuple[str, str]] | None = None) -> list[Prompt]:
    """``n_prompts`` prompts of ``n_shots`` demonstrations plus a query, answer included.

    Queries come from ``queries`` (default: the task's pairs) and demonstrations
    from ``demo_pool`` (default: the task's pairs), never with the query's input
    (an input with several outputs is never its own demonstration).
    """
    if not isinstance(task, Task):
        raise TaskDataError(f"few_shot_prompts takes a Task (e.g. load_task('antonyms')), "
                            f"got {task!r}")
    fmt = get_format(fmt)
    check_count("n_prompts", n_prompts, 1)
    check_count("n_shots", n_shots, 0)
    queries = list(queries if queries is not None else task.pairs)
    pool = list(demo_pool if demo_pool is not None else task.pairs)
    if not queries:
        raise TaskDataError(f"task {task.name!r}: no queries to build prompts from")
    rng = random.Random(f"few-shot-{task.name}-{seed}")
    order = rng.sample(queries, len(queries))
    prompts = []
    for i in range(n_prompts):
        x, y = order[i % len(order)]
        candidates = [p for p in pool if p[0] != x]
        if len(candidates) < n_shots:
            raise TaskDataError(
                f"task {task.name!r} has {len(candidates)} demonstrations available, "
                f"fewer than n_shots={n_shots}; lower n_shots")
        demos = rng.sample(candidates, n_shots)
        prompts.append(render(fmt, demos, x, y, task=task.name, family=task.family))
    return prompts


def zero_shot_prompts(pairs: Sequence[tuple[str, str]] | Task,
                      fmt: PromptFormat | str = "authors",
                      task: Task | str | None = None) -> list[Prompt]:
    """One prompt per pair: the instruction and the query, answer appended for scoring.

    ``pairs`` may be a Task; ``task`` (a Task or a name) names it in errors and
    gives the Hendel format its family.
    """
    return fixed_demo_prompts(pairs, [], fmt, task)


def fixed_demo_prompts(pairs: Sequence[tuple[str, str]] | Task,
                       demos: Sequence[tuple[str, str]], fmt: PromptFormat | str = "authors",
                       task: Task | str | None = None, steer_at: str = "separator"
                       ) -> list[Prompt]:
    """One prompt per pair, each after the same ``demos``, answer appended; steered at
    the query's separator or (``steer_at="first_answer"``) the first demo's answer."""
    fmt = get_format(fmt)
    name, family, pairs = _task_and_pairs(pairs, task)
    return [render(fmt, demos, *_check_pair(fmt, name, p), steer_at=steer_at, task=name,
                   family=family) for p in pairs]
