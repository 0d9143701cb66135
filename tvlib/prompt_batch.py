"""Tokenised prompts and their exact token positions (``tokenize_prompts``).

Tokenisation maps the character spans recorded when a prompt is rendered to
token indices through the tokenizer's offset mapping (never by searching
strings), and the batch is left-padded with positions shifted accordingly. It
refuses what would be scored wrongly: unknown tokens, a lone space scored as the
answer, scored tokens that are not the answer's text. Every token is also given its role in
the prompt (``TOKEN_GROUPS``: instruction, input, separator, output, newline, ...), the
position groups that circuits sum attributions over.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .prompts import Prompt, check_count, task_label
from .tasks import TaskDataError

# What each token of a prompt is (``PromptBatch.token_groups``), by the text it covers:
# the instruction before the first pair, a pair's input, the separator (the query's last
# token, "->"), a pair's output, the joiner between pairs (newlines), other template text
# (e.g. Todd's "A" before ":"), and special tokens without text (BOS). Padding is -1.
TOKEN_GROUPS = ("instruction", "input", "separator", "output", "newline", "template",
                "special")


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
    answer_pos: torch.Tensor       # (B, A, n_first) first tokens of every answer in the text,
                                   # demonstrations then the query (its row equals target_pos)
    token_groups: torch.Tensor     # (B, T) index into TOKEN_GROUPS, -1 for padding
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
                  "answer_end_pos", "steer_pos", "target_pos", "answer_pos", "token_groups")


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
                f"{task_label(prompt.task)}: this tokenizer does not know {piece!r}, text of the "
                f"prompt format itself ({prompt.text!r}); use a format whose words it knows "
                "(the embedded model knows 'authors', 'toy_hendel' and 'toy_todd')")
        raise TaskDataError(
            f"{task_label(prompt.task)}: this tokenizer does not know {piece!r} in the pair "
            f"{pair!r} (input, output); drop the pair or use a model whose tokenizer covers it")


def _scored_tokens(tokenizer, prompt: Prompt, ids, offsets, separator: int,
                   n_first: int, index: int = -1) -> list[int]:
    """The first ``n_first`` tokens of answer ``index`` (default the query's), checked to
    be the answer's own text."""
    span = prompt.answers[index]
    answer, pair = prompt.text[span[0]:span[1]], prompt.pairs[index]
    tokens = _tokens_in(offsets, span)
    if not tokens or tokens[0] <= separator:
        raise TaskDataError(
            f"{task_label(prompt.task)}: the answer {pair[1]!r} does not start after the "
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
            f"{task_label(prompt.task)}: the scored tokens of pair {pair!r} are {pieces} (a "
            f"whitespace-only token, or a token without text, where the answer {answer!r} "
            f"should start); {fix}")
    decoded = tokenizer.decode([ids[i] for i in scored])
    if not _squash(answer).startswith(_squash(decoded)):
        raise TaskDataError(
            f"{task_label(prompt.task)}: the scored tokens of pair {pair!r} decode to {decoded!r}, "
            f"not the start of the answer {answer!r}; the tokenizer changes this text: drop "
            "the pair or use a model whose tokenizer keeps it")
    return scored


def _token_groups(prompt: Prompt, offsets, separators: list[int]) -> list[int]:
    """Each token's index into ``TOKEN_GROUPS``, from the text it covers."""
    group = TOKEN_GROUPS.index
    first_input = prompt.inputs[0][0]
    spans = [(s, "input") for s in prompt.inputs] + [(s, "output") for s in prompt.answers]
    out = []
    for i, (start, end) in enumerate(offsets):
        if end <= start:
            out.append(group("special"))
        elif i in separators:
            out.append(group("separator"))
        elif start < first_input:
            out.append(group("instruction"))
        else:
            inside = [name for (a, b), name in spans if start < b and end > a]
            text = prompt.text[start:end]
            out.append(group(inside[0]) if inside else
                       group("newline") if not text.strip() else group("template"))
    return out


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
                    f"{task_label(prompt.task)}: the prompt format prepends a beginning-of-text "
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
    check_count("n_first", n_first, 1)
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
    answer_pos = torch.full((B, max(len(p.answers) for p in prompts), n_first), -1,
                            dtype=torch.long)
    token_groups = torch.full((B, width), -1, dtype=torch.long)

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
        token_groups[row, pad:] = torch.tensor(_token_groups(prompt, offsets, seps))
        for i in range(len(prompt.answers)):
            tokens = _scored_tokens(tokenizer, prompt, ids, offsets, seps[i], n_first, i)
            answer_pos[row, i, :len(tokens)] = torch.tensor(tokens) + pad
        if len(prompt.answers) > prompt.n_demos:   # the query's answer is in the text
            target_pos[row] = answer_pos[row, len(prompt.answers) - 1]

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return PromptBatch(input_ids, attention_mask, position_ids, separator_pos,
                       answer_end_pos, steer_pos, target_pos, answer_pos, token_groups,
                       list(prompts))
