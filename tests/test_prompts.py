import pytest

from tvlib.detectors import detector_prompts
from tvlib.prompt_batch import tokenize_prompts
from tvlib.prompts import few_shot_prompts, FORMATS, render, TOY_FORMATS, zero_shot_prompts
from tvlib.tasks import Task, TaskDataError

TASK = Task("toy_antonyms", (("hot", "cold"), ("big", "small"), ("up", "down"),
                             ("fast", "slow"), ("new york", "old york")))


def test_authors_format_text_and_spans():
    prompt = render(FORMATS["authors"], [("hot", "cold"), ("big", "small")], "up", "down")
    assert prompt.text == "Follow the pattern:\nhot -> cold\nbig -> small\nup -> down"
    assert [prompt.text[s:e] for s, e in prompt.separators] == [">", ">", ">"]
    assert [prompt.text[s:e] for s, e in prompt.answers] == [" cold", " small", " down"]
    assert prompt.text[slice(*prompt.steer)] == ">"


@pytest.mark.parametrize("fmt,family,expected", [
    # Hendel et al.: linguistic and translation tasks carry a leading space, knowledge not.
    ("hendel", "linguistic", "example: hot-> cold\nexample: up-> down"),
    ("hendel", "translation", "example: hot-> cold\nexample: up-> down"),
    ("hendel", "knowledge", "example:hot->cold\nexample:up->down"),
    ("hendel", "algorithmic", "example:hot->cold\nexample:up->down"),
    ("hendel", None, "example: hot-> cold\nexample: up-> down"),   # MappingTask's default
    # Todd et al.: "Q: x\nA: y" blocks joined by a blank line.
    ("todd", "knowledge", "Q: hot\nA: cold\n\nQ: up\nA: down"),
])
def test_peer_formats_are_the_peers_strings(fmt, family, expected):
    prompt = render(FORMATS[fmt], [("hot", "cold")], "up", "down", family=family)
    assert prompt.text == expected
    assert [prompt.text[s:e] for s, e in prompt.separators] == [fmt == "todd" and ":" or ">"] * 2


@pytest.mark.parametrize("fmt,expected", [
    ("hendel", "hot->cold\nup->down"),
    ("todd", "Q:hot\nA:cold\n\nQ:up\nA:down"),
])
def test_formats_the_embedded_model_was_trained_on_are_unchanged(fmt, expected):
    assert render(TOY_FORMATS[fmt], [("hot", "cold")], "up", "down").text == expected
    assert TOY_FORMATS["authors"] is FORMATS["authors"]


@pytest.mark.parametrize("tok_name", ["word_tokenizer", "bpe_tokenizer"])
def test_positions_under_left_padding(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    # Words the small BPE tokenizer was trained on: an unseen word (" down") would start
    # with a lone-space token, which tokenize_prompts refuses to score.
    prompts = [render(FORMATS["authors"], [("hot", "cold")], "big", "small"),
               render(FORMATS["authors"], [("beautiful", "ugly"),
                                           ("big", "small")], "hot cold", "cold ugly")]
    batch = tokenize_prompts(tok, prompts, n_first=2)
    short, long = batch.attention_mask.sum(-1).tolist()
    assert short < long and batch.attention_mask[0, 0] == 0     # row 0 is left-padded
    for row, prompt in enumerate(prompts):
        pieces = lambda positions: [tok.decode(batch.input_ids[row, p]) for p in positions]
        seps = batch.separator_pos[row][batch.separator_pos[row] >= 0].tolist()
        assert all(piece.strip() == "->" for piece in pieces(seps))
        assert len(seps) == len(prompt.separators)
        assert batch.steer_pos[row] == seps[-1]
        ends = batch.answer_end_pos[row][batch.answer_end_pos[row] >= 0].tolist()
        answers = [prompt.text[s:e] for s, e in prompt.answers[:prompt.n_demos]]
        assert all(a.lower().endswith(p.strip()) for a, p in zip(answers, pieces(ends)))
        targets = batch.target_pos[row][batch.target_pos[row] >= 0].tolist()
        assert targets[0] == seps[-1] + 1                        # answer follows the separator
        assert prompt.target.replace(" ", "").startswith(
            "".join(pieces(targets)).replace(" ", "").lower())
        # position ids restart at 0 on the first real token
        first = int((batch.attention_mask[row] == 0).sum())
        assert batch.position_ids[row, first] == 0
        assert batch.position_ids[row, -1] == (long - 1 if row else short - 1)


def test_targets_mask_short_answers(word_tokenizer):
    batch = tokenize_prompts(word_tokenizer, zero_shot_prompts([("hot", "cold"),
                                                                ("france", "north america")]))
    assert (batch.target_pos[0] >= 0).tolist() == [True, False]   # one-word answer
    assert (batch.target_pos[1] >= 0).tolist() == [True, True]
    assert batch.targets[0, 1] == -1


def test_detector_prompts_steer_at_placeholder(word_tokenizer):
    batch = tokenize_prompts(word_tokenizer, detector_prompts([("hot", "cold")]))
    assert batch.prompts[0].text == "Follow the pattern:\nX -> Y\nhot -> cold"
    assert word_tokenizer.decode(batch.input_ids[0, batch.steer_pos[0]]) == "y"


def test_few_shot_prompts_never_show_query_as_demo():
    prompts = few_shot_prompts(TASK, n_prompts=8, n_shots=3, seed=0)
    for p in prompts:
        demo_inputs = p.text.split("\n")[1:-1]
        assert all(not line.startswith(p.text.split("\n")[-1].split(" ->")[0] + " ->")
                   for line in demo_inputs)
        assert p.n_demos == 3 and len(p.separators) == 4
    assert prompts == few_shot_prompts(TASK, n_prompts=8, n_shots=3, seed=0)   # seeded
    assert prompts != few_shot_prompts(TASK, n_prompts=8, n_shots=3, seed=1)


def test_clear_errors():
    with pytest.raises(TaskDataError, match="needs a non-empty list of prompts"):
        tokenize_prompts(None, [])
    with pytest.raises(TaskDataError, match="fewer than n_shots"):
        few_shot_prompts(TASK, n_prompts=2, n_shots=10, seed=0)
    with pytest.raises(ValueError, match="unknown prompt format"):
        zero_shot_prompts([("a", "b")], fmt="chat")


def test_merged_separator_and_answer_is_an_error():
    # A tokenizer that keeps "x->y" as one token cannot score the answer on its own.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "x->y": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    with pytest.raises(TaskDataError, match="does not start after the separator"):
        tokenize_prompts(tok, [render(TOY_FORMATS["hendel"], [], "x", "y")])
