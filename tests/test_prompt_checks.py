"""Building prompts refuses what would be scored wrongly, naming the task, the pair and
the fix: unknown tokens, a lone space scored as the answer, scored tokens that are not
the answer's text, line breaks inside pairs, and bad counts."""

import re

import pytest

from tvlib.detectors import detector_prompts
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import few_shot_prompts, FORMATS, PromptFormat, render, zero_shot_prompts
from tvlib.tasks import ALL_TASKS, Task, TaskDataError, load_task

EMBEDDED_PAIRS = 100   # the toy preset keeps the first 100 pairs of each task


def test_embedded_preset_limit_is_the_one_checked_here():
    from tvlib.presets import PRESETS
    assert PRESETS["toy"].max_pairs_per_task == EMBEDDED_PAIRS


@pytest.mark.parametrize("name", ALL_TASKS)
def test_embedded_preset_pairs_are_all_known_to_its_tokenizer(word_tokenizer, name):
    task = load_task(name).head(EMBEDDED_PAIRS)
    for prompts in (zero_shot_prompts(task), detector_prompts(task),
                    few_shot_prompts(task, n_prompts=len(task), n_shots=8, seed=0)):
        batch = tokenize_prompts(word_tokenizer, prompts)
        assert (batch.input_ids != word_tokenizer.unk_token_id).all()


def test_pairs_the_tokenizer_does_not_know_are_refused(word_tokenizer):
    # 113 of en_es's 214 answers are unknown to the embedded model's tokenizer.
    with pytest.raises(TaskDataError, match=r"task 'en_es': this tokenizer does not know "
                       r"'\w+' in the pair \('\w+', '\w+'\).*drop the pair or use a model "
                       "whose tokenizer covers it"):
        tokenize_prompts(word_tokenizer, zero_shot_prompts(load_task("en_es")))


@pytest.mark.parametrize("demos,query,pair", [
    ([], ("zzyzx", "cold"), "('zzyzx', 'cold')"),                 # the query's input
    ([("hot", "qwxz")], ("big", "small"), "('hot', 'qwxz')"),      # a demonstration's output
    ([("qwxz", "cold")], ("big", "small"), "('qwxz', 'cold')"),    # a demonstration's input
])
def test_an_unknown_token_anywhere_in_the_prompt_is_refused(word_tokenizer, demos, query, pair):
    prompt = render(FORMATS["authors"], demos, *query, task="antonyms")
    with pytest.raises(TaskDataError, match=f"task 'antonyms'.*in the pair {re.escape(pair)}"):
        tokenize_prompts(word_tokenizer, [prompt])


def test_a_leading_space_in_the_output_is_refused(bpe_tokenizer):
    # " cold" renders as "  cold": the first scored token would be a lone space.
    with pytest.raises(TaskDataError, match=r"task 'antonyms': the scored tokens of pair "
                       r"\('hot', ' cold'\) are \[' ', ' cold'\].*remove the leading space "
                       "from the output; formats add it"):
        tokenize_prompts(bpe_tokenizer, zero_shot_prompts([("hot", " cold")], task="antonyms"))
    # A doubled space inside the answer puts a lone space among the scored tokens.
    with pytest.raises(TaskDataError, match=r"are \[' cold', ' '\].*remove the extra "
                       "whitespace from the output"):
        tokenize_prompts(bpe_tokenizer, zero_shot_prompts([("hot", "cold  small")]))
    tokenize_prompts(bpe_tokenizer, zero_shot_prompts([("hot", "cold small")]))


PLAIN = PromptFormat("plain", "", "{x} ->", " {y}", "\n")   # words the tiny tokenizers know


def _word_level(vocab, pre_tokenizer, normalizer=None):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<unk>", *vocab]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        core.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def test_a_tokenizer_that_makes_a_token_of_a_space_is_refused():
    from tokenizers import Regex, pre_tokenizers
    tok = _word_level(["hot", "cold", "->", " "],
                      pre_tokenizers.Split(Regex(r" |->"), behavior="isolated"))
    with pytest.raises(TaskDataError, match=r"are \[' ', 'cold'\].*makes a token of a space"):
        tokenize_prompts(tok, [render(PLAIN, [], "hot", "cold")])


def test_scored_tokens_that_are_not_the_answer_text_are_refused():
    # A tokenizer that strips accents scores "cafe" for the answer "café".
    from tokenizers import normalizers, pre_tokenizers
    tok = _word_level(["coffee", "cafe", "->"], pre_tokenizers.WhitespaceSplit(),
                      normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]))
    with pytest.raises(TaskDataError, match=r"pair \('coffee', 'café'\) decode to 'cafe', not "
                       "the start of the answer ' café'"):
        tokenize_prompts(tok, zero_shot_prompts([("coffee", "café")], PLAIN))


@pytest.mark.parametrize("fmt", ["authors", "hendel", "todd"])
@pytest.mark.parametrize("pair,role", [(("hot\ncold", "x"), "input"), (("hot", "co\nld"), "output"),
                                       (("hot", "cold\r"), "output"),
                                       (("hot\u2028", "cold"), "input")])
def test_line_breaks_inside_a_pair_are_refused(fmt, pair, role):
    with pytest.raises(TaskDataError, match=f"task 'antonyms': the {role} of pair .* holds a "
                       f"line break or the '{fmt}' format's joiner.*remove it from the {role}"):
        zero_shot_prompts([pair], fmt, task="antonyms")
    task = Task("antonyms", (("a", "b"), ("c", "d"), pair))
    with pytest.raises(TaskDataError, match="holds a line break"):
        few_shot_prompts(task, 3, 2, seed=0, fmt=fmt)


def test_prompts_name_their_task(word_tokenizer):
    task = load_task("antonyms").head(20)
    for prompts in (few_shot_prompts(task, 2, 2, seed=0), zero_shot_prompts(task),
                    detector_prompts(task.pairs, task="antonyms")):
        assert {p.task for p in prompts} == {"antonyms"}
    assert zero_shot_prompts(task.pairs)[0].task == ""


@pytest.mark.parametrize("n_first", [0, -1, 1.5, True, "2"])
def test_n_first_below_one_is_refused(word_tokenizer, n_first):
    prompts = zero_shot_prompts([("hot", "cold")])
    with pytest.raises(TaskDataError, match=rf"n_first must be an integer >= 1, got "
                       rf"{n_first!r}.*n_first=1"):
        tokenize_prompts(word_tokenizer, prompts, n_first=n_first)


@pytest.mark.parametrize("kwargs,message", [
    ({"n_prompts": 0}, "n_prompts must be an integer >= 1, got 0"),
    ({"n_prompts": 2.0}, "n_prompts must be an integer >= 1, got 2.0"),
    ({"n_shots": -1}, "n_shots must be an integer >= 0, got -1"),
    ({"n_shots": "3"}, "n_shots must be an integer >= 0, got '3'"),
])
def test_bad_few_shot_counts_are_refused(kwargs, message):
    args = {"n_prompts": 2, "n_shots": 2, **kwargs}
    with pytest.raises(TaskDataError, match=message):
        few_shot_prompts(load_task("antonyms"), seed=0, **args)


def test_bad_arguments_are_refused(word_tokenizer):
    with pytest.raises(TaskDataError, match="few_shot_prompts takes a Task"):
        few_shot_prompts("antonyms", 2, 2, seed=0)
    with pytest.raises(TaskDataError, match="pairs must be a list of"):
        zero_shot_prompts("hot")
    with pytest.raises(TaskDataError, match=r"\('hot',\) is not an \(input, output\) pair"):
        zero_shot_prompts([("hot",)])
    with pytest.raises(TaskDataError, match="the output of pair .* must be a non-empty string"):
        detector_prompts([("hot", " ")])
    with pytest.raises(TaskDataError, match="needs a non-empty list of prompts"):
        tokenize_prompts(word_tokenizer, zero_shot_prompts([("hot", "cold")])[0])
    with pytest.raises(TaskDataError, match="task must be a Task, a task name or None"):
        zero_shot_prompts([("hot", "cold")], task=3)


def test_inputs_with_several_outputs_stay_out_of_the_demonstration_pool(word_tokenizer):
    from tvlib.experiments import PromptConfig, build_task_prompts
    base = load_task("antonyms").head(60).pairs
    # Every input also appears with a second (known) output.
    task = Task("antonyms", base + tuple((x, base[(i + 1) % 60][1]) for i, (x, _) in
                                         enumerate(base)), "linguistic")
    cfg = PromptConfig(n_prompts=8, n_shots=4, n_eval=30, n_train=8)
    prompts = build_task_prompts(word_tokenizer, task, cfg)
    held_out = {x for p in prompts.zero_shot.prompts for x, _ in p.pairs}
    used = {x for batch in (prompts.few_shot, prompts.train)
            for p in batch.prompts for x, _ in p.pairs}
    assert held_out and used and not held_out & used
    assert all(p.task == "antonyms" for p in prompts.few_shot.prompts)
    # Few-shot prompts still never show the query's input as a demonstration.
    for p in prompts.few_shot.prompts:
        assert p.pairs[-1][0] not in {x for x, _ in p.pairs[:-1]}
