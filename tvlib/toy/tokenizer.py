"""The embedded model's word-level tokenizer."""

from __future__ import annotations

from ..prompts import TOY_FORMATS
from ..tasks import ALGORITHMIC_TASKS, load_task
from .data import FACT_TEMPLATES, ToyConfig, toy_tasks

SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers
    # Words split on spaces; "->", ":" and newlines are tokens of their own, so the
    # Hendel ("x->y") and Todd ("Q:x") formats tokenise like the authors' one.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"->|:|\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
    ])


def build_tokenizer(texts: list[str]):
    """A word-level Hugging Face tokenizer over every word in ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Lowercase()
    pre = _pre_tokenizer()
    words = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizer
    core.pre_tokenizer = pre
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
        eos_token="<eos>", padding_side="left")


def vocabulary_texts(cfg: ToyConfig) -> list[str]:
    """Every string the model may see: templates, formats, all pairs, placeholders."""
    texts = [fmt.instruction + fmt.query + fmt.answer for fmt in TOY_FORMATS.values()]
    texts += [t.format(x="", y="") for t in FACT_TEMPLATES.values()]
    texts += ["X Y"]
    for task in toy_tasks(cfg).values():
        texts += [f"{x} {y}" for x, y in task.pairs]
    texts += [x for name in ALGORITHMIC_TASKS for x in load_task(name).inputs]
    return texts
