"""Few-shot, zero-shot and detector prompts, and their exact token positions.

A prompt is rendered as text while the character span of every separator and
every answer is recorded. Tokenisation then maps those spans to token indices
through the tokenizer's offset mapping (never by searching strings), and the
batch is left-padded with positions shifted accordingly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .tasks import Task, TaskDataError


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


FORMATS = {
    # The writeup's authors: "Follow the pattern:\nx1 -> y1\nx2 -> y2\n...\nxq ->"
    "authors": PromptFormat("authors", "Follow the pattern:\n", "{x} ->", " {y}", "\n"),
    # Hendel et al. (2023): "x1->y1\nx2->y2\n...\nxq->"
    "hendel": PromptFormat("hendel", "", "{x}->", "{y}", "\n"),
    # Todd et al. (2024): "Q:x1\nA:y1\n\nQ:x2\nA:y2\n\n...Q:xq\nA:"
    "todd": PromptFormat("todd", "", "Q:{x}\nA:", "{y}", "\n\n"),
}

PLACEHOLDER_PAIR = ("X", "Y")   # the literal one-shot example of detector prompts


def get_format(name: str) -> PromptFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown prompt format {name!r}; choose one of {sorted(FORMATS)}") from None


@dataclass(frozen=True)
class Prompt:
    """Prompt text with the character spans that matter.

    Spans are (start, end) with end exclusive. ``separators`` and ``answers``
    list the demonstrations first, then the query; the query's answer span is
    present only when the answer is written into the text (teacher forcing).
    """

    text: str
    separators: tuple[tuple[int, int], ...]
    answers: tuple[tuple[int, int], ...]     # demonstrations' answers, then the query's
    n_demos: int
    target: str                              # the query's expected output
    steer: tuple[int, int]                   # span of the token to steer


def render(fmt: PromptFormat, demos: Sequence[tuple[str, str]], query: str,
           target: str, with_answer: bool = True, steer_at: str = "separator") -> Prompt:
    """Write demos and a query in ``fmt``; record spans as the text grows.

    ``steer_at`` is "separator" (the query's separator) or "first_answer" (the
    first demonstration's answer, i.e. ``Y`` in detector prompts).
    """
    text = fmt.instruction
    separators, answers = [], []
    for i, (x, y) in enumerate([*demos, (query, target)]):
        if i:
            text += fmt.joiner
        text += fmt.query.format(x=x)
        separators.append((len(text) - 1, len(text)))   # the query's last character
        is_query = i == len(demos)
        if not is_query or with_answer:
            start = len(text)
            text += fmt.answer.format(y=y)
            answers.append((start, len(text)))
    if steer_at == "separator":
        steer = separators[-1]
    elif steer_at == "first_answer":
        if not demos:
            raise ValueError("steer_at='first_answer' needs at least one demonstration")
        steer = answers[0]
    else:
        raise ValueError(f"steer_at must be 'separator' or 'first_answer', not {steer_at!r}")
    return Prompt(text, tuple(separators), tuple(answers), len(demos), target, steer)


def few_shot_prompts(task: Task, n_prompts: int, n_shots: int, seed: int,
                     fmt: PromptFormat | str = "authors",
                     queries: Sequence[tuple[str, str]] | None = None,
                     demo_pool: Sequence[tuple[str, str]] | None = None) -> list[Prompt]:
    """``n_prompts`` prompts of ``n_shots`` demonstrations plus a query, answer included.

    Queries come from ``queries`` (default: the task's pairs) and demonstrations
    from ``demo_pool`` (default: the task's pairs), never repeating the query.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    queries = list(queries if queries is not None else task.pairs)
    pool = list(demo_pool if demo_pool is not None else task.pairs)
    if not queries or n_prompts < 1:
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
        prompts.append(render(fmt, demos, x, y))
    return prompts


def zero_shot_prompts(pairs: Sequence[tuple[str, str]],
                      fmt: PromptFormat | str = "authors") -> list[Prompt]:
    """One prompt per pair: the instruction and the query, answer appended for scoring."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if not pairs:
        raise TaskDataError("no pairs given for zero-shot prompts")
    return [render(fmt, [], x, y) for x, y in pairs]


def detector_prompts(pairs: Sequence[tuple[str, str]],
                     fmt: PromptFormat | str = "authors") -> list[Prompt]:
    """One-shot prompts with the literal placeholder ``X -> Y``, steered at ``Y``."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if not pairs:
        raise TaskDataError("no pairs given for detector prompts")
    return [render(fmt, [PLACEHOLDER_PAIR], x, y, steer_at="first_answer") for x, y in pairs]


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


def tokenize_prompts(tokenizer, prompts: Sequence[Prompt], n_first: int = 2) -> PromptBatch:
    """Tokenise once and locate separators, answers and scored tokens by offsets."""
    if not prompts:
        raise TaskDataError("empty prompt list: build prompts before tokenising")
    encoded = tokenizer([p.text for p in prompts], return_offsets_mapping=True,
                        add_special_tokens=True)
    width = max(len(ids) for ids in encoded["input_ids"])
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

    for row, prompt in enumerate(prompts):
        ids, offsets = encoded["input_ids"][row], encoded["offset_mapping"][row]
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
            answer_tokens = _tokens_in(offsets, prompt.answers[-1])
            if not answer_tokens or answer_tokens[0] <= seps[-1]:
                raise TaskDataError(
                    f"the answer {prompt.target!r} does not start after the separator in "
                    f"{prompt.text!r}: the tokenizer merges them; use a format whose answer "
                    "starts with a space (e.g. 'authors')")
            scored = answer_tokens[:n_first]
            target_pos[row, :len(scored)] = torch.tensor(scored) + pad

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return PromptBatch(input_ids, attention_mask, position_ids, separator_pos,
                       answer_end_pos, steer_pos, target_pos, list(prompts))
