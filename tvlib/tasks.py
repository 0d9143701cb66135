"""In-context-learning tasks: (input, output) pairs loaded from JSON or generated.

Two public formats are read:
- Hendel et al.: one JSON object ``{input: output, ...}``;
- Todd et al.: a JSON list ``[{"input": ..., "output": ...}, ...]``.
The project's own files under ``data/tasks/`` use the Hendel format.

Both peers ship files where one input has several outputs (Hendel's antonyms:
``safe -> risky`` and ``safe -> dangerous``; Todd's next_item: ``I -> J`` and
``I -> II``). They load here with a warning; ``duplicates`` picks what is kept.
"""

from __future__ import annotations

import json
import random
import warnings
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

# Task families are the folders of Hendel et al.'s data/ (their "hendel" prompt format
# puts a space before inputs and outputs of some families only; see prompts.FORMATS).
HENDEL_FAMILIES = ("linguistic", "translation", "knowledge", "algorithmic")
_FAMILY_MEMBERS = {
    "knowledge": ("country_capital", "football_player_position", "location_continent",
                  "location_country", "location_language", "location_religion",
                  "person_language", "person_profession"),
    "linguistic": ("antonyms", "plural_singular", "singular_plural", "present_simple_gerund",
                   "present_simple_past_perfect", "present_simple_past_simple"),
    "translation": ("en_es", "en_fr", "en_it", "es_en", "fr_en", "it_en"),
    "algorithmic": ALGORITHMIC_TASKS,   # ours; Hendel's algorithmic tasks are generated too
}
TASK_FAMILIES = {name: family for family, names in _FAMILY_MEMBERS.items() for name in names}
DUPLICATE_CHOICES = ("keep_all", "first", "last")


class TaskDataError(ValueError):
    """A task file, task name or parameter that cannot be used."""


class DuplicateInputWarning(UserWarning):
    """A task file holds an input more than once."""


@dataclass(frozen=True)
class Task:
    name: str
    pairs: tuple[tuple[str, str], ...]   # (input, output), in file order; inputs may repeat
    family: str | None = None            # Hendel's folder: linguistic, translation, knowledge...

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TaskDataError(f"task name {self.name!r} must be a non-empty string")
        if not self.pairs:
            raise TaskDataError(f"task {self.name!r} has no pairs")
        bad = next((p for p in self.pairs if not (isinstance(p, tuple) and len(p) == 2
                                                   and all(isinstance(v, str) for v in p))), None)
        if bad is not None:
            raise TaskDataError(f"task {self.name!r}: pair {bad!r} is not an (input, output) "
                                "tuple of two strings")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def inputs(self) -> list[str]:
        return [x for x, _ in self.pairs]

    @property
    def outputs(self) -> list[str]:
        return [y for _, y in self.pairs]

    def as_dict(self) -> dict[str, str]:
        """``{input: output}``; refused when an input has several outputs (it would keep one)."""
        multi = {x: ys for x, ys in self.as_multidict().items() if len(ys) > 1}
        if multi:
            x, ys = next(iter(multi.items()))
            raise TaskDataError(
                f"task {self.name!r}: {len(multi)} inputs have several outputs (e.g. {x!r}: "
                f"{ys}); use as_multidict(), or load with duplicates='first' or 'last'")
        return dict(self.pairs)

    def as_multidict(self) -> dict[str, list[str]]:
        """``{input: [outputs in file order]}``."""
        out: dict[str, list[str]] = {}
        for x, y in self.pairs:
            out.setdefault(x, []).append(y)
        return out

    def head(self, n: int | None) -> Task:
        """The first ``n`` pairs (all when ``n`` is None)."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TaskDataError(f"head(n): n must be a positive integer or None, got {n!r}")
        return Task(self.name, self.pairs[:n], self.family)


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


def _validated_pairs(entries, source: str, duplicates: str) -> tuple[tuple[str, str], ...]:
    """Check every entry; resolve repeated inputs as ``duplicates`` says (see load_task_file)."""
    outputs: dict[str, list[str]] = {}   # input -> distinct outputs, in file order
    rows: list[tuple[str, str]] = []     # distinct (input, output) pairs, in file order
    for x, y, where in entries:
        for value in (x, y):
            if not isinstance(value, str):
                raise TaskDataError(
                    f"{source}: {where} has a non-string value {value!r} "
                    f"({type(value).__name__}); inputs and outputs must be strings")
            if not value.strip():
                raise TaskDataError(f"{source}: {where} has an empty input or output")
        ys = outputs.setdefault(x, [])
        if y not in ys:
            ys.append(y)
            rows.append((x, y))
    n_exact = len(entries) - len(rows)
    if not outputs:
        raise TaskDataError(f"{source}: the task is empty; add at least one input/output pair")
    multi = {x: ys for x, ys in outputs.items() if len(ys) > 1}
    if multi or n_exact:
        kept = {"keep_all": "every output kept as an example",
                "first": "the first output kept", "last": "the last output kept"}[duplicates]
        example = f" (e.g. {next(iter(multi))!r}: {next(iter(multi.values()))})" if multi else ""
        warnings.warn(
            f"{source}: {len(multi)} inputs have several outputs{example}, {kept}; "
            f"{n_exact} exact duplicate rows (same input and output) dropped. Pass "
            "duplicates='keep_all', 'first' or 'last' to choose", DuplicateInputWarning,
            stacklevel=3)
    if duplicates == "keep_all":
        return tuple(rows)
    pick = 0 if duplicates == "first" else -1
    return tuple((x, ys[pick]) for x, ys in outputs.items())


def _check_duplicates(duplicates: str) -> None:
    if duplicates not in DUPLICATE_CHOICES:
        raise TaskDataError(f"duplicates={duplicates!r} is not one of {DUPLICATE_CHOICES}")


def load_task_file(path: str | Path, name: str | None = None, duplicates: str = "keep_all",
                   family: str | None = None) -> Task:
    """Read a task from a Hendel-style or Todd-style JSON file.

    ``duplicates`` says what an input with several outputs keeps: "keep_all"
    (default; every (input, output) pair is an example, in file order, as Todd et
    al.'s loader does), "first" or "last" (one pair per input, where the input
    first appears; Hendel et al. read files with ``json.load``, which keeps the
    last). Exact duplicate rows (same input and output) are always dropped to one:
    a copy adds nothing but weight in sampling. Either case warns with the counts. ``family`` defaults to the parent folder when it is one
    of Hendel's (``HENDEL_FAMILIES``), else to the built-in table of task names.
    """
    _check_duplicates(duplicates)
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"task file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_JsonObject)
    except json.JSONDecodeError as err:
        raise TaskDataError(f"{path}: not valid JSON ({err})") from err
    name = name or path.stem
    if family is None:
        parent = path.parent.name
        family = parent if parent in HENDEL_FAMILIES else TASK_FAMILIES.get(name)
    return Task(name, _validated_pairs(_entries(data, str(path)), str(path), duplicates), family)


def generate_algorithmic(name: str, n_lists: int = 120, seed: int = 0) -> Task:
    """Deterministic pairs for the generated tasks (numbers, lists of words)."""
    if name in _NUMBER_OFFSETS:
        # The same inputs 1..98 for the three tasks, so only the task tells them apart.
        offset = _NUMBER_OFFSETS[name]
        return Task(name, tuple((str(k), str(k + offset)) for k in range(1, 99)), "algorithmic")
    if name not in LIST_PICKS:
        raise TaskDataError(f"{name!r} is not a generated task; those are {ALGORITHMIC_TASKS}")
    if isinstance(n_lists, bool) or not isinstance(n_lists, int) or n_lists < 1:
        raise TaskDataError(f"n_lists must be a positive integer, got {n_lists!r}")
    # One seed for all list tasks, so they share their inputs.
    rng = random.Random(f"lists-{seed}")
    pairs: dict[str, str] = {}
    while len(pairs) < n_lists:
        x, y = random_list_pair(rng, name)
        pairs[x] = y
    return Task(name, tuple(pairs.items()), "algorithmic")


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


def load_task(name_or_path: str | Path, duplicates: str = "keep_all") -> Task:
    """Load a task by name (``data/tasks/{name}.json`` or a generated task) or by path."""
    if not isinstance(name_or_path, (str, Path)):
        raise TaskDataError(f"load_task takes a task name or a path, got {name_or_path!r} "
                            f"({type(name_or_path).__name__}); e.g. load_task('antonyms')")
    _check_duplicates(duplicates)
    text = str(name_or_path)
    if text in ALGORITHMIC_TASKS:
        return generate_algorithmic(text)
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        return load_task_file(path, duplicates=duplicates)
    candidate = TASKS_DIR / f"{text}.json"
    if candidate.is_file():
        return load_task_file(candidate, name=text, duplicates=duplicates)
    known = ", ".join(sorted(ALL_TASKS))
    raise TaskDataError(
        f"unknown task {text!r}: known tasks are {known}; or pass the path of a JSON file")


def load_tasks(names, duplicates: str = "keep_all") -> dict[str, Task]:
    """Load several tasks by name or path; refuse an empty list or a name given twice."""
    if isinstance(names, (str, Path)):
        raise TaskDataError(f"load_tasks takes a list of task names, got the single "
                            f"{type(names).__name__} {str(names)!r}; pass a list, e.g. "
                            f"[{str(names)!r}]")
    names = list(names)
    if not names:
        raise TaskDataError("no tasks given: pass at least one task name, e.g. ['antonyms']")
    tasks: dict[str, Task] = {}
    for n in names:
        task = load_task(n, duplicates)
        if task.name in tasks:
            raise TaskDataError(f"task {task.name!r} is given twice (as {n!r}); "
                                "list each task once")
        tasks[task.name] = task
    return tasks


# Folders holding task files in the peers' repositories: Hendel et al.'s data/{family}/
# and Todd et al.'s dataset_files/{abstractive,extractive}/.
TASK_FOLDERS = (*HENDEL_FAMILIES, "abstractive", "extractive")


def load_task_dir(root: str | Path, duplicates: str = "keep_all") -> dict[str, Task]:
    """Every task JSON under ``root`` (e.g. a clone of Hendel's or Todd's repository).

    When the tree has folders named like the peers' task folders (``TASK_FOLDERS``),
    only the files directly in them are tasks (Todd's dataset_files/generate/ holds
    other JSON); the JSON files left out are named in a warning. Otherwise every
    JSON file under ``root`` is a task. Tasks are named by file stem; a stem found
    twice is an error naming both files. ``duplicates``: see ``load_task_file``.
    """
    _check_duplicates(duplicates)
    root = Path(root)
    if not root.is_dir():
        raise TaskDataError(f"{root} is not a folder of task JSON files")
    found = sorted(root.rglob("*.json"))
    chosen = [p for p in found if p.parent.name in TASK_FOLDERS] or found
    skipped = [str(p.relative_to(root)) for p in found if p not in chosen]
    if skipped:
        warnings.warn(f"{root}: {len(skipped)} JSON files outside the task folders "
                      f"{TASK_FOLDERS} are not loaded: {skipped}", stacklevel=2)
    tasks, sources = {}, {}
    for path in chosen:
        if path.stem in tasks:
            raise TaskDataError(f"two task files are named {path.stem!r}: {sources[path.stem]} "
                                f"and {path}; load one of them with load_task_file")
        tasks[path.stem], sources[path.stem] = load_task_file(path, duplicates=duplicates), path
    if not tasks:
        raise TaskDataError(f"no .json task files under {root}")
    return tasks
