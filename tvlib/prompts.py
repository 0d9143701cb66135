"""Few-shot, zero-shot and detector prompts, and their exact token positions.

A prompt is rendered as text while the character span of every separator and
every answer is recorded. Tokenisation then maps those spans to token indices
through the tokenizer's offset mapping (never by searching strings), and the
batch is left-padded with positions shifted accordingly. Tokenisation refuses
what would be scored wrongly: unknown tokens, a lone space scored as the
answer, scored tokens that are not the answer's text.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

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

# What the embedded model was trained on (tvlib/toy.py): the authors' format and
# simplified forms of the peers' formats. Not the peers' formats; kept so that
# retraining reproduces the shipped model.
TOY_FORMATS = {
    "authors": FORMATS["authors"],
    "hendel": PromptFormat("toy_hendel", "", "{x}->", "{y}", "\n"),
    "todd": PromptFormat("toy_todd", "", "Q:{x}\nA:", "{y}", "\n\n"),
}
_NAMED = {**FORMATS, "toy_hendel": TOY_FORMATS["hendel"], "toy_todd": TOY_FORMATS["todd"]}

PLACEHOLDER_PAIR = ("X", "Y")   # the literal one-shot example of detector prompts
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"   # what str.splitlines() splits on


def get_format(fmt: PromptFormat | str) -> PromptFormat:
    """A format by name (``FORMATS``, or "toy_hendel" / "toy_todd"), or ``fmt`` itself."""
    if isinstance(fmt, PromptFormat):
        return fmt
    try:
        return _NAMED[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prompt format {fmt!r}; choose one of {sorted(_NAMED)}") from None


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


def _named(task: str) -> str:
    return f"task {task!r}" if task else "a prompt of an unnamed task"


def _check_pair(fmt: PromptFormat, task: str, pair) -> tuple[str, str]:
    """``pair`` as (input, output), refused if rendering it would change the prompt's lines."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TaskDataError(f"{_named(task)}: {pair!r} is not an (input, output) pair")
    for role, value in zip(("input", "output"), pair):
        if not isinstance(value, str) or not value.strip():
            raise TaskDataError(f"{_named(task)}: the {role} of pair {tuple(pair)!r} must be a "
                                "non-empty string; drop the pair")
        if any(c in value for c in _LINE_BREAKS) or (fmt.joiner and fmt.joiner in value):
            raise TaskDataError(
                f"{_named(task)}: the {role} of pair {tuple(pair)!r} holds a line break or the "
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


def _count(name: str, value, minimum: int) -> int:
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
        raise TaskDataError(f"{_named(name)}: pairs must be a list of (input, output) pairs "
                            f"or a Task, got {pairs!r}")
    if not pairs:
        raise TaskDataError(f"{_named(name)}: no pairs given to build prompts from")
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
    _count("n_prompts", n_prompts, 1)
    _count("n_shots", n_shots, 0)
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
    fmt = get_format(fmt)
    name, family, pairs = _task_and_pairs(pairs, task)
    return [render(fmt, [], *_check_pair(fmt, name, p), task=name, family=family)
            for p in pairs]


def detector_prompts(pairs: Sequence[tuple[str, str]] | Task,
                     fmt: PromptFormat | str = "authors",
                     task: Task | str | None = None) -> list[Prompt]:
    """One-shot prompts with the literal placeholder ``X -> Y``, steered at ``Y``."""
    fmt = get_format(fmt)
    name, family, pairs = _task_and_pairs(pairs, task)
    return [render(fmt, [PLACEHOLDER_PAIR], *_check_pair(fmt, name, p),
                   steer_at="first_answer", task=name, family=family) for p in pairs]


@dataclass
class PromptBatch:
    """Tokenised, left-padded prompts with the token positions that matter.

    Position tensors index the padded sequence; -1 marks an absent entry.
    """

    input_ids: torch.Tensor        # (B, T)
    attention_mask: torch.Tensor   # (B, T)
    position_ids: torch.Tensor     # (B, T), 0 at each row's first real token
    separator_pos: torch.Tensor    # (B, S) every separator, demos then query
    answer_end_pos: torch.Tensor   # (B, D) last token of each demonstration's answer
    steer_pos: torch.Tensor        # (B,) the token steered
    target_pos: torch.Tensor       # (B, n_first) answer tokens scored; logits come from pos - 1
    prompts: list[Prompt] = field(repr=False)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def targets(self) -> torch.Tensor:
        """(B, n_first) token ids to predict, -1 where absent."""
        ids = self.input_ids.gather(1, self.target_pos.clamp(min=0))
        return ids.masked_fill(self.target_pos < 0, -1)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}

    def scored_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every scored answer token, prompt by prompt: (rows, predict_pos, targets), each (N,).

        ``predict_pos`` is the position whose logits predict the token (its own - 1).
        """
        rows, slot = (self.target_pos >= 0).nonzero(as_tuple=True)        # row-major order
        pos = self.target_pos[rows, slot]
        return rows, pos - 1, self.input_ids[rows, pos]

    def select(self, rows: slice | torch.Tensor) -> PromptBatch:
        """A sub-batch (the padding width is kept, so positions stay valid)."""
        index = torch.arange(len(self))[rows]
        tensors = {name: getattr(self, name)[index] for name in _TENSOR_FIELDS}
        return PromptBatch(**tensors, prompts=[self.prompts[i] for i in index.tolist()])

    def chunks(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.select(slice(start, start + batch_size))


_TENSOR_FIELDS = ("input_ids", "attention_mask", "position_ids", "separator_pos",
                  "answer_end_pos", "steer_pos", "target_pos")


def _token_ending_at(offsets: list[tuple[int, int]], span: tuple[int, int], text: str) -> int:
    """Index of the token holding the last character of ``span``."""
    last_char = span[1] - 1
    for i, (start, end) in enumerate(offsets):
        if start <= last_char < end:
            return i
    raise TaskDataError(
        f"no token covers character {last_char} ({text[last_char]!r}) of prompt {text!r}; "
        "the tokenizer must return offsets (a fast tokenizer)")


def _tokens_in(offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the (non-special) tokens overlapping ``span``."""
    return [i for i, (start, end) in enumerate(offsets)
            if end > start and start < span[1] and end > span[0]]


def _pair_at(prompt: Prompt, char: int) -> tuple[str, str] | None:
    """The (input, output) pair whose text holds character ``char``; None for format text."""
    for i, pair in enumerate(prompt.pairs):
        spans = [prompt.inputs[i], *prompt.answers[i:i + 1]]
        if any(start <= char < end for start, end in spans):
            return pair
    return None


def _squash(text: str) -> str:
    """Text compared without case, whitespace or a trailing cut UTF-8 character."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split()).rstrip("\ufffd")


def _check_known(tokenizer, prompt: Prompt, ids: list[int], offsets) -> None:
    """Refuse a prompt with a token the tokenizer does not know (its unk token)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk not in ids:
        return
    for token, (start, end) in zip(ids, offsets):
        if token != unk or end <= start:   # special tokens (GPT-2's BOS is its unk) have no text
            continue
        piece, pair = prompt.text[start:end], _pair_at(prompt, start)
        if pair is None:
            raise TaskDataError(
                f"{_named(prompt.task)}: this tokenizer does not know {piece!r}, text of the "
                f"prompt format itself ({prompt.text!r}); use a format whose words it knows "
                "(the embedded model knows 'authors', 'toy_hendel' and 'toy_todd')")
        raise TaskDataError(
            f"{_named(prompt.task)}: this tokenizer does not know {piece!r} in the pair "
            f"{pair!r} (input, output); drop the pair or use a model whose tokenizer covers it")


def _scored_tokens(tokenizer, prompt: Prompt, ids, offsets, separator: int,
                   n_first: int) -> list[int]:
    """The first ``n_first`` answer tokens, checked to be the answer's own text."""
    span = prompt.answers[-1]
    answer, pair = prompt.text[span[0]:span[1]], prompt.pairs[-1]
    tokens = _tokens_in(offsets, span)
    if not tokens or tokens[0] <= separator:
        raise TaskDataError(
            f"{_named(prompt.task)}: the answer {prompt.target!r} does not start after the "
            f"separator in {prompt.text!r}: the tokenizer merges them; use a format whose "
            "answer starts with a space (e.g. 'authors')")
    scored = tokens[:n_first]
    pieces = [prompt.text[slice(*offsets[i])] for i in scored]
    if scored != list(range(separator + 1, separator + 1 + len(scored))) or \
            any(not piece.strip() for piece in pieces):
        y = pair[1]
        fix = ("remove the leading space from the output; formats add it" if y != y.lstrip()
               else "remove the extra whitespace from the output" if " ".join(y.split()) != y
               else "this tokenizer makes a token of a space alone; use a tokenizer that "
               "joins the space to the word, or a format with no space before the answer")
        raise TaskDataError(
            f"{_named(prompt.task)}: the scored tokens of pair {pair!r} are {pieces} (a "
            f"whitespace-only token, or a token without text, where the answer {answer!r} "
            f"should start); {fix}")
    decoded = tokenizer.decode([ids[i] for i in scored])
    if not _squash(answer).startswith(_squash(decoded)):
        raise TaskDataError(
            f"{_named(prompt.task)}: the scored tokens of pair {pair!r} decode to {decoded!r}, "
            f"not the start of the answer {answer!r}; the tokenizer changes this text: drop "
            "the pair or use a model whose tokenizer keeps it")
    return scored


def _encode(tokenizer, prompts: Sequence[Prompt]) -> list[tuple[list[int], list]]:
    """(ids, offsets) per prompt, with BOS prepended where the format wants one and
    the tokenizer adds none (offsets (0, 0), as for any special token)."""
    encoded = tokenizer([p.text for p in prompts], return_offsets_mapping=True,
                        add_special_tokens=True)
    bos = tokenizer.bos_token_id
    rows = []
    for prompt, ids, offsets in zip(prompts, encoded["input_ids"], encoded["offset_mapping"]):
        ids, offsets = list(ids), [tuple(o) for o in offsets]
        if prompt.bos and (not ids or ids[0] != bos):
            if bos is None:
                raise TaskDataError(
                    f"{_named(prompt.task)}: the prompt format prepends a beginning-of-text "
                    "token (as Todd et al. do) but this tokenizer has no bos_token; set "
                    "tokenizer.bos_token (GPT-2's is '<|endoftext|>') or use another format")
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        rows.append((ids, offsets))
    return rows


def tokenize_prompts(tokenizer, prompts: Sequence[Prompt], n_first: int = 2) -> PromptBatch:
    """Tokenise once, check every prompt's tokens and locate separators, answers and
    scored tokens by offsets. Refused (naming the task and pair): an unknown token
    anywhere, scored tokens that are not the answer's own text."""
    if not isinstance(prompts, Prompt) and hasattr(prompts, "__iter__"):
        prompts = list(prompts)
    if isinstance(prompts, Prompt) or not prompts:
        raise TaskDataError("tokenize_prompts needs a non-empty list of prompts; build them "
                            "with few_shot_prompts / zero_shot_prompts / detector_prompts")
    _count("n_first", n_first, 1)
    rows = _encode(tokenizer, prompts)
    width = max(len(ids) for ids, _ in rows)
    n_sep = max(len(p.separators) for p in prompts)
    n_demo = max(p.n_demos for p in prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    B = len(prompts)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    separator_pos = torch.full((B, n_sep), -1, dtype=torch.long)
    answer_end_pos = torch.full((B, n_demo), -1, dtype=torch.long)
    steer_pos = torch.empty(B, dtype=torch.long)
    target_pos = torch.full((B, n_first), -1, dtype=torch.long)

    for row, (prompt, (ids, offsets)) in enumerate(zip(prompts, rows)):
        _check_known(tokenizer, prompt, ids, offsets)
        pad = width - len(ids)   # left padding shifts every position by `pad`
        input_ids[row, pad:] = torch.tensor(ids)
        attention_mask[row, pad:] = 1
        seps = [_token_ending_at(offsets, s, prompt.text) for s in prompt.separators]
        separator_pos[row, :len(seps)] = torch.tensor(seps) + pad
        ends = [_token_ending_at(offsets, a, prompt.text) for a in prompt.answers[:prompt.n_demos]]
        if ends:
            answer_end_pos[row, :len(ends)] = torch.tensor(ends) + pad
        steer_pos[row] = _token_ending_at(offsets, prompt.steer, prompt.text) + pad
        if len(prompt.answers) > prompt.n_demos:   # the query's answer is in the text
            scored = _scored_tokens(tokenizer, prompt, ids, offsets, seps[-1], n_first)
            target_pos[row, :len(scored)] = torch.tensor(scored) + pad

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return PromptBatch(input_ids, attention_mask, position_ids, separator_pos,
                       answer_end_pos, steer_pos, target_pos, list(prompts))
