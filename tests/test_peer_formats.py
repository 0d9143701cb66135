"""The peers' prompt formats, exactly as their public code builds them, and their
token positions under left padding.

Hendel et al. (github.com/roeehendel/icl_task_vectors): core/data/datasets/few_shot_format.py
(FewShotFormat) and core/data/tasks/mapping_task.py (the leading space).
Todd et al. (github.com/ericwtodd/function_vectors): src/utils/prompt_utils.py
(word_pairs_to_prompt_data, create_fewshot_primer, create_prompt).
"""

import pytest

from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import few_shot_prompts, FORMATS, render, zero_shot_prompts
from tvlib.tasks import Task, TaskDataError, load_task

LINGUISTIC = Task("antonyms", (("hot", "cold"), ("big", "small"), ("up", "down"),
                               ("fast", "slow")), "linguistic")


@pytest.fixture(scope="module")
def gpt2_like():
    """Byte-level BPE set up like GPT-2's tokenizer: trimmed offsets, "<|endoftext|>" as
    BOS, EOS and unk, and no BOS added to the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=True)
    corpus = ["Q: hot\nA: cold\n\nQ: big\nA: small\n\n",
              "example: hot-> cold\nexample: big-> small", "example:france->paris\n", "Follow the pattern:\nhot -> cold\nbig -> small\n",
              "beautiful ugly up down fast slow"] * 50
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=end, eos_token=end,
                                   unk_token=end, pad_token=end, padding_side="left")


def test_hendel_prompt_is_their_few_shot_format():
    # FewShotFormat.format_dataset: train examples "example:{input}->{output}" joined by
    # "\n", then "\n" and the test example "example:{input}->"; MappingTask gives
    # linguistic inputs and outputs a leading space.
    prompt = few_shot_prompts(LINGUISTIC, 1, 2, seed=0, fmt="hendel")[0]
    *demos, (x, y) = prompt.pairs
    theirs = "\n".join(f"example:{' ' + a}->{' ' + b}" for a, b in demos) + "\n" + \
        f"example:{' ' + x}->"
    assert prompt.text == theirs + " " + y
    assert prompt.text[:prompt.answers[-1][0]] == theirs
    assert prompt.task == "antonyms"


def test_hendel_knowledge_tasks_have_no_space():
    task = load_task("country_capital")
    x, y = task.pairs[0]
    assert task.family == "knowledge"
    assert zero_shot_prompts(task.pairs[:1], "hendel", task=task)[0].text == f"example:{x}->{y}"
    assert zero_shot_prompts(task.pairs[:1], "hendel", task="country_capital")[0].text == \
        f"example:{x}->{y}"
    assert zero_shot_prompts(task.head(1), "hendel")[0].text == f"example:{x}->{y}"
    antonym = load_task("antonyms").pairs[0]
    assert zero_shot_prompts([antonym], "hendel", task="antonyms")[0].text == \
        f"example: {antonym[0]}-> {antonym[1]}"


def test_todd_prompt_is_their_prompt():
    # word_pairs_to_prompt_data (prefixes Q:/A:, separators "\n" and "\n\n", a space before
    # every input and output), create_prompt: primer + "Q:" + " x" + "\n" + "A:".
    prompt = few_shot_prompts(LINGUISTIC, 1, 3, seed=0, fmt="todd")[0]
    *demos, (x, y) = prompt.pairs
    theirs = "".join(f"Q:{' ' + a}\nA:{' ' + b}\n\n" for a, b in demos) + f"Q:{' ' + x}\nA:"
    assert prompt.text == theirs + " " + y
    assert prompt.text[slice(*prompt.answers[-1])] == " " + y
    assert prompt.bos


def test_todd_prepends_bos_only_when_the_tokenizer_adds_none(gpt2_like, word_tokenizer):
    prompts = zero_shot_prompts([("hot", "cold")], "todd")
    ids = tokenize_prompts(gpt2_like, prompts).input_ids[0].tolist()
    assert ids[0] == gpt2_like.bos_token_id and ids[1:] == gpt2_like("Q: hot\nA: cold").input_ids
    ids = tokenize_prompts(word_tokenizer, prompts).input_ids[0].tolist()
    assert ids == word_tokenizer("Q: hot\nA: cold").input_ids   # its own <bos>, not two
    assert ids.count(word_tokenizer.bos_token_id) == 1


def test_todd_needs_a_bos_token(bpe_tokenizer):
    with pytest.raises(TaskDataError, match="prepends a beginning-of-text token.*no bos_token"):
        tokenize_prompts(bpe_tokenizer, zero_shot_prompts([("hot", "cold")], "todd"))


@pytest.mark.parametrize("fmt,family,sep", [("todd", None, ":"), ("hendel", "linguistic", "->"),
                                            ("hendel", "knowledge", "->")])
def test_peer_positions_under_left_padding(gpt2_like, fmt, family, sep):
    prompts = [render(FORMATS[fmt], [("hot", "cold")], "big", "small", family=family),
               render(FORMATS[fmt], [("up", "down"), ("fast", "slow"), ("hot", "cold")],
                      "beautiful", "ugly", family=family)]
    batch = tokenize_prompts(gpt2_like, prompts)
    assert batch.attention_mask[0, 0] == 0                       # row 0 is left-padded
    piece = lambda row, pos: gpt2_like.decode(batch.input_ids[row, pos]).strip()
    for row, prompt in enumerate(prompts):
        first = int((batch.attention_mask[row] == 0).sum())
        assert batch.position_ids[row, first] == 0
        assert (batch.input_ids[row, first] == gpt2_like.bos_token_id) == (fmt == "todd")
        seps = batch.separator_pos[row][batch.separator_pos[row] >= 0].tolist()
        assert [piece(row, p) for p in seps] == [sep] * len(prompt.separators)
        assert batch.steer_pos[row] == seps[-1]
        ends = batch.answer_end_pos[row][batch.answer_end_pos[row] >= 0].tolist()
        assert len(ends) == prompt.n_demos
        assert all(y.endswith(piece(row, p)) for (_, y), p in zip(prompt.pairs, ends))
        targets = batch.target_pos[row][batch.target_pos[row] >= 0].tolist()
        assert targets[0] == seps[-1] + 1
        assert prompt.target.startswith("".join(piece(row, p) for p in targets))


def test_hendel_format_is_refused_on_the_embedded_model(word_tokenizer):
    # Its word-level tokenizer never saw "example"; the shipped model was trained on the
    # simplified "toy_hendel" format instead.
    with pytest.raises(TaskDataError, match="does not know 'example', text of the prompt "
                       "format itself.*'toy_hendel'"):
        tokenize_prompts(word_tokenizer, zero_shot_prompts([("hot", "cold")], "hendel"))
    tokenize_prompts(word_tokenizer, zero_shot_prompts([("hot", "cold")], "toy_hendel"))


def test_leading_space_answer_is_refused_with_trimmed_offsets(gpt2_like):
    # GPT-2's tokenizer trims offsets: the lone "Ġ" of "  cold" has no text, and "Ġcold"
    # would be scored after it, in the wrong context.
    with pytest.raises(TaskDataError, match=r"task 'antonyms'.*pair \('hot', ' cold'\).*"
                       "remove the leading space from the output; formats add it"):
        tokenize_prompts(gpt2_like, zero_shot_prompts([("hot", " cold")], task="antonyms"))
