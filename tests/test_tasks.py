import json

import pytest

from tvlib.tasks import (ALGORITHMIC_TASKS, ALL_TASKS, HENDEL_TASKS, TaskDataError, load_task,
                         load_task_file, load_tasks)
from tvlib.tasks import DuplicateInputWarning, Task, generate_algorithmic, load_task_dir


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", HENDEL_TASKS)
def test_shipped_tasks_are_valid_and_large_enough(name):
    task = load_task(name)
    assert task.name == name
    assert len(task) >= 60
    assert len(set(task.inputs)) == len(task)


def test_generated_tasks_share_inputs():
    plus1, minus1, plus2 = (load_task(n) for n in ("num_plus_1", "num_minus_1", "num_plus_2"))
    assert plus1.inputs == minus1.inputs == plus2.inputs
    assert plus1.as_dict()["7"] == "8" and minus1.as_dict()["7"] == "6"
    assert plus2.as_dict()["7"] == "9"
    first, last, second = (load_task(n) for n in ("list_first", "list_last", "list_second"))
    assert first.inputs == last.inputs == second.inputs
    x = first.inputs[0]
    assert (first.as_dict()[x], second.as_dict()[x], last.as_dict()[x]) == \
        (x.split()[0], x.split()[1], x.split()[-1])
    assert load_task("list_first") == first          # deterministic
    assert set(ALGORITHMIC_TASKS) <= set(ALL_TASKS)


def test_hendel_and_todd_formats_load_the_same(tmp_path):
    hendel = write(tmp_path, "h.json", json.dumps({"hot": "cold", "big": "small"}))
    todd = write(tmp_path, "t.json", json.dumps([{"input": "hot", "output": "cold"},
                                                 {"input": "big", "output": "small"}]))
    assert load_task_file(hendel).pairs == load_task_file(todd).pairs == \
        (("hot", "cold"), ("big", "small"))
    assert load_task(str(todd)).name == "t"


@pytest.mark.parametrize("text,message", [
    ("{}", "the task is empty"),
    ("[]", "the task is empty"),
    ('{"hot": 3}', "non-string value 3"),
    ('[{"input": "a", "output": ["b"]}]', "entry 0 has a non-string value"),
    ('[{"input": "a"}]', "entry 0 is"),
    ('{"hot": ""}', "empty input or output"),
    ('"text"', "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_files_name_the_file_and_entry(tmp_path, text, message):
    path = write(tmp_path, "bad.json", text)
    with pytest.raises(TaskDataError, match=message) as err:
        load_task_file(path)
    assert "bad.json" in str(err.value)


def test_duplicate_with_same_output_is_dropped_and_counted(tmp_path):
    path = write(tmp_path, "dup.json", '{"hot": "cold", "hot": "cold"}')
    with pytest.warns(DuplicateInputWarning, match="0 inputs have several outputs.*"
                      "1 exact duplicate rows"):
        assert load_task_file(path).pairs == (("hot", "cold"),)


def test_unknown_task_and_empty_list():
    with pytest.raises(TaskDataError, match="unknown task 'antonym'.*antonyms"):
        load_task("antonym")
    with pytest.raises(TaskDataError, match="no tasks given"):
        load_tasks([])


def test_load_a_cloned_repository_layout(tmp_path):
    (tmp_path / "data" / "linguistic").mkdir(parents=True)
    (tmp_path / "dataset_files" / "abstractive").mkdir(parents=True)
    write(tmp_path / "data" / "linguistic", "antonyms.json", '{"hot": "cold"}')
    write(tmp_path / "dataset_files" / "abstractive", "capitalize.json",
          '[{"input": "a", "output": "A"}]')
    tasks = load_task_dir(tmp_path)
    assert sorted(tasks) == ["antonyms", "capitalize"]
    (tmp_path / "dataset_files" / "extractive").mkdir()
    write(tmp_path / "dataset_files" / "extractive", "antonyms.json", '{"up": "down"}')
    with pytest.raises(TaskDataError, match="two task files are named 'antonyms'"):
        load_task_dir(tmp_path)
    with pytest.raises(TaskDataError, match="not a folder"):
        load_task_dir(tmp_path / "missing")


# ------------------------------------------------- inputs with several outputs

HENDEL_DUPLICATES = '{"safe": "risky", "hot": "cold", "safe": "dangerous", "hot": "cold"}'
TODD_DUPLICATES = json.dumps([{"input": "I", "output": "J"}, {"input": "I", "output": "II"},
                              {"input": "a", "output": "b"}])


@pytest.mark.parametrize("duplicates,expected", [
    ("keep_all", (("safe", "risky"), ("hot", "cold"), ("safe", "dangerous"))),   # file order
    ("first", (("safe", "risky"), ("hot", "cold"))),
    ("last", (("safe", "dangerous"), ("hot", "cold"))),
])
def test_an_input_with_several_outputs_loads_with_a_warning(tmp_path, duplicates, expected):
    path = write(tmp_path, "antonyms.json", HENDEL_DUPLICATES)
    with pytest.warns(DuplicateInputWarning, match=r"antonyms.json: 1 inputs have several "
                      r"outputs \(e.g. 'safe': \['risky', 'dangerous'\]\).*1 exact duplicate"):
        task = load_task_file(path, duplicates=duplicates)
    assert task.pairs == expected
    with pytest.warns(DuplicateInputWarning):
        assert load_task(str(path), duplicates=duplicates).pairs == expected


def test_todd_file_with_an_input_twice_keeps_every_pair(tmp_path):
    path = write(tmp_path, "next_item.json", TODD_DUPLICATES)
    with pytest.warns(DuplicateInputWarning, match="1 inputs have several outputs.*every "
                      "output kept as an example; 0 exact duplicate rows"):
        task = load_task_file(path)
    assert task.pairs == (("I", "J"), ("I", "II"), ("a", "b"))
    assert task.as_multidict() == {"I": ["J", "II"], "a": ["b"]}
    with pytest.raises(TaskDataError, match=r"1 inputs have several outputs \(e.g. 'I'.*"
                       "as_multidict.*duplicates='first'"):
        task.as_dict()   # would silently keep one output


def test_bad_duplicates_option_is_refused(tmp_path):
    path = write(tmp_path, "t.json", '{"a": "b"}')
    for call in (lambda: load_task_file(path, duplicates="drop"),
                 lambda: load_task("antonyms", duplicates="drop"),
                 lambda: load_task_dir(tmp_path, duplicates="drop")):
        with pytest.raises(TaskDataError, match=r"duplicates='drop' is not one of \("
                           "'keep_all', 'first', 'last'\\)"):
            call()


def test_peer_repository_layouts_load_whole(tmp_path):
    # Hendel et al.: data/{family}/*.json as {input: output}; antonyms has inputs twice.
    for family, name, text in [("linguistic", "antonyms", HENDEL_DUPLICATES),
                               ("translation", "en_es", '{"cat": "gato"}'),
                               ("knowledge", "country_capital", '{"France": "Paris"}')]:
        (tmp_path / "hendel" / "data" / family).mkdir(parents=True, exist_ok=True)
        write(tmp_path / "hendel" / "data" / family, f"{name}.json", text)
    # Todd et al.: dataset_files/{abstractive,extractive}/*.json as a list, and other
    # JSON (not tasks) in dataset_files/generate/.
    todd = tmp_path / "todd" / "dataset_files"
    for folder in ("abstractive", "extractive", "generate"):
        (todd / folder).mkdir(parents=True)
    write(todd / "abstractive", "next_item.json", TODD_DUPLICATES)
    write(todd / "extractive", "choose_first_of_3.json",
          json.dumps([{"input": "a, b, c", "output": "a"}]))
    write(todd / "generate", "categories.json", '{"animal": ["cat", "dog"]}')

    with pytest.warns(DuplicateInputWarning):
        hendel = load_task_dir(tmp_path / "hendel")
    assert sorted(hendel) == ["antonyms", "country_capital", "en_es"]
    assert len(hendel["antonyms"]) == 3
    assert {n: t.family for n, t in hendel.items()} == {
        "antonyms": "linguistic", "en_es": "translation", "country_capital": "knowledge"}
    with pytest.warns(UserWarning) as record:
        todd_tasks = load_task_dir(tmp_path / "todd")
    assert sorted(todd_tasks) == ["choose_first_of_3", "next_item"]
    assert any("generate/categories.json" in str(w.message) and "not loaded" in str(w.message)
               for w in record)
    # A folder with no peer task folders: every JSON file under it is a task.
    (tmp_path / "flat" / "sub").mkdir(parents=True)
    write(tmp_path / "flat", "a.json", '{"x": "y"}')
    write(tmp_path / "flat" / "sub", "b.json", '[{"input": "x", "output": "y"}]')
    assert sorted(load_task_dir(tmp_path / "flat")) == ["a", "b"]


# ------------------------------------------------- families

def test_shipped_task_families_follow_hendel_folders():
    # The folders of github.com/roeehendel/icl_task_vectors data/.
    folders = {
        "knowledge": ["country_capital", "football_player_position", "location_continent",
                      "location_country", "location_language", "location_religion",
                      "person_language", "person_profession"],
        "linguistic": ["antonyms", "plural_singular", "present_simple_gerund",
                       "present_simple_past_perfect", "present_simple_past_simple",
                       "singular_plural"],
        "translation": ["en_es", "en_fr", "en_it", "es_en", "fr_en", "it_en"],
    }
    for family, names in folders.items():
        for name in names:
            assert load_task(name).family == family, name
    assert sorted(n for names in folders.values() for n in names) == sorted(HENDEL_TASKS)
    assert all(load_task(n).family == "algorithmic" for n in ALGORITHMIC_TASKS)
    assert load_task("antonyms").head(5).family == "linguistic"


# ------------------------------------------------- parameters never quietly changed

def test_load_tasks_refuses_a_string_and_a_task_twice():
    with pytest.raises(TaskDataError, match=r"pass a list, e.g. \['antonyms'\]"):
        load_tasks("antonyms")
    with pytest.raises(TaskDataError, match="task 'antonyms' is given twice"):
        load_tasks(["antonyms", "en_es", "antonyms"])
    from tvlib.paths import TASKS_DIR
    with pytest.raises(TaskDataError, match="task 'antonyms' is given twice"):
        load_tasks(["antonyms", TASKS_DIR / "antonyms.json"])


@pytest.mark.parametrize("n", [0, -1, 2.5, True, "10"])
def test_head_refuses_bad_counts(n):
    with pytest.raises(TaskDataError, match=f"head\\(n\\): n must be a positive integer.*{n!r}"):
        load_task("antonyms").head(n)


def test_other_bad_parameters_are_refused():
    with pytest.raises(TaskDataError, match="n_lists must be a positive integer, got 0"):
        generate_algorithmic("list_first", n_lists=0)
    with pytest.raises(TaskDataError, match=r"load_task takes a task name or a path.*\['a'\]"):
        load_task(["a"])
    with pytest.raises(TaskDataError, match=r"pair \('a',\) is not an \(input, output\)"):
        Task("t", (("a",),))
    with pytest.raises(TaskDataError, match="task name '' must be a non-empty string"):
        Task("", (("a", "b"),))
