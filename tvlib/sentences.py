"""Sentence-level generalisation (method.md section 6): does a task vector made from
word-level translation prompts carry over to translating whole sentences?

The pairs (``data/sentences``) were written for this project: short everyday English
sentences with Spanish and French translations, checked in a second pass (the folder's
README records how). The whole target sentence is scored: every one of its tokens, each
checked to be the answer's (``prompt_batch``), and a batch where a sentence might be cut
is refused.
"""

from __future__ import annotations

from .paths import DATA_DIR
from .prompt_batch import PromptBatch, tokenize_prompts
from .prompts import few_shot_prompts, zero_shot_prompts
from .tasks import Task, TaskDataError, load_task_file

SENTENCES_DIR = DATA_DIR / "sentences"
# word-level task -> its sentence pairs
SENTENCE_TASKS = {"en_es": "en_es_sentences", "en_fr": "en_fr_sentences"}
SENTENCE_TOKENS = 64      # answer tokens scored at most: more than any sentence here has


def load_sentences(word_task: str) -> Task:
    """The sentence pairs of a word-level translation task ("en_es", "en_fr")."""
    if word_task not in SENTENCE_TASKS:
        raise TaskDataError(f"no sentence pairs for task {word_task!r}; there are pairs for "
                            f"{sorted(SENTENCE_TASKS)}")
    name = SENTENCE_TASKS[word_task]
    return load_task_file(SENTENCES_DIR / f"{name}.json", name=name, family="translation")


def check_whole_sentences(batch: PromptBatch, n_tokens: int) -> None:
    """Fail if any answer may be cut: every one of its ``n_tokens`` slots is scored."""
    full = (batch.target_pos >= 0).all(-1).nonzero().flatten().tolist()
    if full:
        prompt = batch.prompts[full[0]]
        raise ValueError(f"the answer {prompt.target!r} has {n_tokens} or more tokens, so it "
                         f"may be scored only in part: raise n_tokens above {n_tokens}")


def sentence_batches(tokenizer, sentences: Task, fmt: str = "authors", n_shots: int = 3,
                     seed: int = 0, n_tokens: int = SENTENCE_TOKENS
                     ) -> dict[str, PromptBatch]:
    """Zero-shot prompts of every sentence pair, and the same queries after ``n_shots``
    other sentence pairs (sentence ICL), each scored on the whole target sentence."""
    zero = tokenize_prompts(tokenizer, zero_shot_prompts(sentences, fmt), n_tokens)
    few = tokenize_prompts(tokenizer, few_shot_prompts(
        sentences, len(sentences.pairs), n_shots, seed, fmt, queries=sentences.pairs),
        n_tokens)
    for batch in (zero, few):
        check_whole_sentences(batch, n_tokens)
    return {"zero_shot": zero, "icl": few}
