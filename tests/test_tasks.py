import json

import pytest

from tvlib.tasks import (ALGORITHMIC_TASKS, ALL_TASKS, HENDEL_TASKS, TaskDataError, load_task,
                         load_task_file, load_tasks)


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
    ('{"hot": "cold", "hot": "warm"}', "'hot' appears twice with different outputs"),
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


def test_duplicate_with_same_output_is_fine(tmp_path):
    path = write(tmp_path, "dup.json", '{"hot": "cold", "hot": "cold"}')
    assert load_task_file(path).pairs == (("hot", "cold"),)


def test_unknown_task_and_empty_list():
    with pytest.raises(TaskDataError, match="unknown task 'antonym'.*antonyms"):
        load_task("antonym")
    with pytest.raises(TaskDataError, match="no tasks given"):
        load_tasks([])


def test_load_a_cloned_repository_layout(tmp_path):
    from tvlib.tasks import load_task_dir
    (tmp_path / "data" / "linguistic").mkdir(parents=True)
    (tmp_path / "dataset_files" / "abstractive").mkdir(parents=True)
    write(tmp_path / "data" / "linguistic", "antonyms.json", '{"hot": "cold"}')
    write(tmp_path / "dataset_files" / "abstractive", "capitalize.json",
          '[{"input": "a", "output": "A"}]')
    tasks = load_task_dir(tmp_path)
    assert sorted(tasks) == ["antonyms", "capitalize"]
    write(tmp_path / "dataset_files", "antonyms.json", '{"up": "down"}')
    with pytest.raises(TaskDataError, match="two task files are named 'antonyms'"):
        load_task_dir(tmp_path)
    with pytest.raises(TaskDataError, match="not a folder"):
        load_task_dir(tmp_path / "missing")
