"""In-context-learning tasks: (input, output) pairs loaded from JSON or generated.

Two public formats are read:
- Hendel et al.: one JSON object ``{input: output, ...}``;
- Todd et al.: a JSON list ``[{"input": ..., "output": ...}, ...]``.
The project's own files under ``data/tasks/`` use the Hendel format.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .paths import TASKS_DIR

# The 20 tasks of Hendel et al. (2023), written for this project in data/tasks/.
HENDEL_TASKS = (
    "antonyms", "country_capital", "football_player_position", "location_continent",
    "location_country", "location_language", "location_religion", "person_language",
    "person_profession", "plural_singular", "singular_plural", "present_simple_gerund",
    "present_simple_past_perfect", "present_simple_past_simple", "en_es", "en_fr",
    "en_it", "es_en", "fr_en", "it_en",
)
ALGORITHMIC_TASKS = (
    "list_first", "list_last", "list_second", "num_plus_1", "num_minus_1", "num_plus_2",
)
ALL_TASKS = HENDEL_TASKS + ALGORITHMIC_TASKS


class TaskDataError(ValueError):
    """A task file or task name that cannot be used."""


@dataclass(frozen=True)
class Task:
    name: str
    pairs: tuple[tuple[str, str], ...]   # (input, output), in file order

    def __post_init__(self):
        if not self.pairs:
            raise TaskDataError(f"task {self.name!r} has no pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def inputs(self) -> list[str]:
        return [x for x, _ in self.pairs]

    @property
    def outputs(self) -> list[str]:
        return [y for _, y in self.pairs]

    def as_dict(self) -> dict[str, str]:
        return dict(self.pairs)

    def head(self, n: int | None) -> Task:
        """The first ``n`` pairs (all when ``n`` is None)."""
        return self if n is None else Task(self.name, self.pairs[:n])


class _JsonObject(list):
    """A JSON object kept as its list of (key, value) pairs, so duplicate keys stay visible."""


def _entries(data, source: str) -> list[tuple[object, object, str]]:
    """(input, output, where) for each entry of a parsed Hendel or Todd file."""
    if isinstance(data, _JsonObject):  # Hendel et al.: {input: output, ...}
        return [(x, y, f"entry {x!r}") for x, y in data]
    if isinstance(data, list):  # Todd et al.: [{"input": x, "output": y}, ...]
        entries = []
        for i, item in enumerate(data):
            item = dict(item) if isinstance(item, _JsonObject) else item
            if not isinstance(item, dict) or not {"input", "output"} <= set(item):
                raise TaskDataError(
                    f"{source}: entry {i} is {item!r}; each entry must be an object with "
                    "'input' and 'output' keys")
            entries.append((item["input"], item["output"], f"entry {i}"))
        return entries
    raise TaskDataError(
        f"{source}: expected a JSON object {{input: output}} or a list of "
        f"{{'input', 'output'}} objects, got {type(data).__name__}")


def _validated_pairs(entries, source: str) -> tuple[tuple[str, str], ...]:
    pairs: dict[str, str] = {}
    for x, y, where in entries:
        for value in (x, y):
            if not isinstance(value, str):
                raise TaskDataError(
                    f"{source}: {where} has a non-string value {value!r} "
                    f"({type(value).__name__}); inputs and outputs must be strings")
            if not value.strip():
                raise TaskDataError(f"{source}: {where} has an empty input or output")
        if x in pairs and pairs[x] != y:
            raise TaskDataError(
                f"{source}: input {x!r} appears twice with different outputs "
                f"({pairs[x]!r} and {y!r}); keep one of them")
        pairs[x] = y
    if not pairs:
        raise TaskDataError(f"{source}: the task is empty; add at least one input/output pair")
    return tuple(pairs.items())


def load_task_file(path: str | Path, name: str | None = None) -> Task:
    """Read a task from a Hendel-style or Todd-style JSON file."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"task file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_JsonObject)
    except json.JSONDecodeError as err:
        raise TaskDataError(f"{path}: not valid JSON ({err})") from err
    return Task(name or path.stem, _validated_pairs(_entries(data, str(path)), str(path)))


def generate_algorithmic(name: str, n_lists: int = 120, seed: int = 0) -> Task:
    """Deterministic pairs for the generated tasks (numbers, lists of words)."""
    if name in _NUMBER_OFFSETS:
        # The same inputs 1..98 for the three tasks, so only the task tells them apart.
        offset = _NUMBER_OFFSETS[name]
        return Task(name, tuple((str(k), str(k + offset)) for k in range(1, 99)))
    if name not in LIST_PICKS:
        raise TaskDataError(f"{name!r} is not a generated task; those are {ALGORITHMIC_TASKS}")
    # One seed for all list tasks, so they share their inputs.
    rng = random.Random(f"lists-{seed}")
    pairs: dict[str, str] = {}
    while len(pairs) < n_lists:
        x, y = random_list_pair(rng, name)
        pairs[x] = y
    return Task(name, tuple(pairs.items()))


def random_list_pair(rng: random.Random, name: str) -> tuple[str, str]:
    """One (list, picked item) pair of list task ``name``: 3 or 4 distinct words."""
    items = rng.sample(LIST_WORDS, rng.randint(3, 4))
    return " ".join(items), items[LIST_PICKS[name]]


_NUMBER_OFFSETS = {"num_plus_1": 1, "num_minus_1": -1, "num_plus_2": 2}
LIST_PICKS = {"list_first": 0, "list_last": -1, "list_second": 1}
LIST_WORDS = (
    "apple bread chair cloud dog egg fish grape hat ink jam key lamp milk nest "
    "orange pen queen rain sock tree van wall box yarn zoo bell coat door frog"
).split()


def load_task(name_or_path: str | Path) -> Task:
    """Load a task by name (``data/tasks/{name}.json`` or a generated task) or by path."""
    text = str(name_or_path)
    if text in ALGORITHMIC_TASKS:
        return generate_algorithmic(text)
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        return load_task_file(path)
    candidate = TASKS_DIR / f"{text}.json"
    if candidate.is_file():
        return load_task_file(candidate, name=text)
    known = ", ".join(sorted(ALL_TASKS))
    raise TaskDataError(
        f"unknown task {text!r}: known tasks are {known}; or pass the path of a JSON file")


def load_tasks(names) -> dict[str, Task]:
    """Load several tasks by name; raise on an empty list."""
    names = list(names)
    if not names:
        raise TaskDataError("no tasks given: pass at least one task name, e.g. ['antonyms']")
    tasks = [load_task(n) for n in names]
    return {task.name: task for task in tasks}


def load_task_dir(root: str | Path) -> dict[str, Task]:
    """Every task JSON under ``root`` (e.g. a clone of Hendel's or Todd's repository).

    Tasks are named by file stem; a stem found twice is an error naming both files.
    """
    root = Path(root)
    if not root.is_dir():
        raise TaskDataError(f"{root} is not a folder of task JSON files")
    tasks, sources = {}, {}
    for path in sorted(root.rglob("*.json")):
        if path.stem in tasks:
            raise TaskDataError(f"two task files are named {path.stem!r}: {sources[path.stem]} "
                                f"and {path}; load one of them with load_task_file")
        tasks[path.stem], sources[path.stem] = load_task_file(path), path
    if not tasks:
        raise TaskDataError(f"no .json task files under {root}")
    return tasks
