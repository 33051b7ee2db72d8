"""Dataset mapping on inline rows with each source's real column layout; loading with the Hub call stubbed out."""

from __future__ import annotations

import re

import pytest
from datasets import Dataset, DatasetDict

import bandpo_trl.data as data
from bandpo_trl.data import (
    EVAL_DATASETS,
    TRAIN_DATASETS,
    available_datasets,
    load_named_dataset,
    map_aime24_row,
    map_aime25_row,
    map_amc23_row,
    map_dapo_math_17k_row,
    map_gsm8k_row,
    map_math500_row,
    map_math_row,
    parse_dataset_paths,
)

# The paper's instruction, written out here independently of the module's template.
INSTRUCTION_HEAD = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
INSTRUCTION_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'


def paper_prompt(problem: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": INSTRUCTION_HEAD + problem + INSTRUCTION_TAIL}]


DAPO_ROW = {  # open-r1/DAPO-Math-17k-Processed, config "en"
    "prompt": INSTRUCTION_HEAD + "Find the sum of all integers $n$ with $n^2 < 10$." + INSTRUCTION_TAIL,
    "solution": "0",
    "data_source": "math_dapo",
    "source_prompt": [{"content": "...", "role": "user"}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "0", "style": "rule-lighteval/MATH_v2"},
    "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"},
}
MATH_ROWS = [  # DigitalLearningGmbH/MATH-lighteval
    {
        "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
        "level": "Level 3",
        "type": "Prealgebra",
        "solution": "We have $\\frac{1}{2} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.",
    },
    {"problem": "Compute $1+1$.", "level": "Level 1", "type": "Algebra", "solution": "$1+1=\\boxed{2}$."},
    {"problem": "Odd one.", "level": "Level ?", "type": "Geometry", "solution": "It is $\\boxed{5}$."},
    {"problem": "No box here.", "level": "Level 5", "type": "Algebra", "solution": "The answer is 7."},
    {"problem": "Find $x$.", "level": "Level 5", "type": "Algebra", "solution": "So $x = \\boxed{-\\sqrt{2}}$."},
]
GSM8K_ROW = {  # openai/gsm8k, config "main"
    "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
    "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 1,072",
}


def test_dapo_row_keeps_the_problem_once_inside_the_paper_prompt():
    mapped = map_dapo_math_17k_row(DAPO_ROW)
    assert mapped == {
        "prompt": paper_prompt("Find the sum of all integers $n$ with $n^2 < 10$."),
        "answer": "0",
        "problem_id": "dapo_math_17k/9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079",
    }


def test_dapo_row_without_the_wrapper_is_wrapped():
    row = dict(DAPO_ROW, prompt="  What is 6 * 7?\n")
    assert map_dapo_math_17k_row(row)["prompt"] == paper_prompt("What is 6 * 7?")


def test_math_row_takes_the_last_boxed_answer_and_levels_3_to_5_are_kept():
    mapped = map_math_row(MATH_ROWS[0])
    assert mapped["prompt"] == paper_prompt("What is $\\frac{1}{2} + \\frac{1}{4}$?")
    assert mapped["answer"] == "\\frac{3}{4}"
    assert re.fullmatch(r"math_l3_5/[0-9a-f]{12}", mapped["problem_id"])
    assert map_math_row(MATH_ROWS[4])["answer"] == "-\\sqrt{2}"
    assert [data.is_math_train_row(row) for row in MATH_ROWS] == [True, False, False, False, True]


def test_gsm8k_row_answer_is_the_number_after_hashes():
    mapped = map_gsm8k_row(GSM8K_ROW)
    assert mapped["answer"] == "1072"
    assert mapped["prompt"] == paper_prompt(GSM8K_ROW["question"])
    assert mapped["problem_id"].startswith("gsm8k/")


def test_eval_rows():
    aime24 = {
        "id": 60,
        "problem": "Find $m+n$.",
        "solution": "... $\\boxed{204}$",
        "answer": "204",
        "url": "u",
        "year": "2024",
    }
    assert map_aime24_row(aime24) == {
        "prompt": paper_prompt("Find $m+n$."),
        "answer": "204",
        "problem_id": "aime24/60",
    }
    aime25 = {"problem": "Find the sum.", "answer": "70", "id": "0"}
    assert map_aime25_row(aime25) == {
        "prompt": paper_prompt("Find the sum."),
        "answer": "70",
        "problem_id": "aime25/0",
    }
    amc23 = {"id": 3, "question": "How many?", "answer": 27.0, "url": "u"}  # answers stored as floats
    assert map_amc23_row(amc23) == {"prompt": paper_prompt("How many?"), "answer": "27", "problem_id": "amc23/3"}
    assert map_amc23_row({"question": "Ratio?", "answer": 0.5})["answer"] == "0.5"
    math500 = {
        "problem": "Convert $(0,3)$ to polar.",
        "solution": "...",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    }
    assert map_math500_row(math500) == {
        "prompt": paper_prompt("Convert $(0,3)$ to polar."),
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "problem_id": "math500/test/precalculus/807.json",
    }


def test_toy_arithmetic_is_seeded_and_its_answers_are_right():
    ds = load_named_dataset("toy_arithmetic", num_samples=50, seed=3)
    assert ds.column_names == ["prompt", "answer", "problem_id"]
    assert len(ds) == 50
    for row in ds:
        a, b = re.fullmatch(r"(\d+)\+(\d+)=", row["prompt"]).groups()
        assert int(row["answer"]) == int(a) + int(b)
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9
        assert row["problem_id"] == f"toy_arithmetic/{a}+{b}"
    assert load_named_dataset("toy_arithmetic", num_samples=50, seed=3).to_list() == ds.to_list()
    assert load_named_dataset("toy_arithmetic", num_samples=50, seed=4)["prompt"] != ds["prompt"]
    assert load_named_dataset("toy_arithmetic", num_samples=50, seed=3, split="test")["prompt"] != ds["prompt"]


def test_unknown_dataset_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown dataset 'dapo'") as error:
        load_named_dataset("dapo")
    for name in available_datasets():
        assert name in str(error.value)


def test_registry_names():
    assert set(TRAIN_DATASETS) | set(EVAL_DATASETS) == set(available_datasets())
    assert {"dapo_math_17k", "math_l3_5", "gsm8k"} <= set(TRAIN_DATASETS)
    assert {"aime24", "aime25", "amc23", "math500"} <= set(EVAL_DATASETS)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace `datasets.load_dataset` inside the module by inline rows; record what was asked for."""
    calls = []
    rows = {"DigitalLearningGmbH/MATH-lighteval": MATH_ROWS, "open-r1/DAPO-Math-17k-Processed": [DAPO_ROW] * 5}

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return Dataset.from_list(rows[path])

    monkeypatch.setattr(data, "load_dataset", load_dataset)
    return calls


def test_load_named_dataset_filters_maps_and_subsamples(fake_hub):
    math = load_named_dataset("math_l3_5")
    assert fake_hub == [("DigitalLearningGmbH/MATH-lighteval", "default", "train")]
    assert math.column_names == ["prompt", "answer", "problem_id"]
    assert math["answer"] == ["\\frac{3}{4}", "-\\sqrt{2}"]  # levels 3-5 with a boxed answer only

    dapo = load_named_dataset("dapo_math_17k", split="train", num_samples=3, seed=0)
    assert fake_hub[-1] == ("open-r1/DAPO-Math-17k-Processed", "en", "train")
    assert len(dapo) == 3
    assert dapo[0]["prompt"] == paper_prompt("Find the sum of all integers $n$ with $n^2 < 10$.")


# Local copies of the named datasets (offline clusters): the same row mapping from files written here.


def test_local_parquet_file_gets_the_dataset_mapping(tmp_path):
    path = tmp_path / "dapo.parquet"
    Dataset.from_list([DAPO_ROW] * 4).to_parquet(str(path))
    dapo = load_named_dataset("dapo_math_17k", path=str(path), num_samples=2, seed=0)
    assert dapo.column_names == ["prompt", "answer", "problem_id"] and len(dapo) == 2
    assert dapo[0]["prompt"] == paper_prompt("Find the sum of all integers $n$ with $n^2 < 10$.")
    assert dapo[0]["problem_id"] == "dapo_math_17k/9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"


def test_local_jsonl_file_and_save_to_disk_directory_with_splits(tmp_path):
    jsonl = tmp_path / "gsm8k.jsonl"
    Dataset.from_list([GSM8K_ROW]).to_json(str(jsonl))
    assert load_named_dataset("gsm8k", path=str(jsonl))["answer"] == ["1072"]

    saved = tmp_path / "math"
    DatasetDict({"train": Dataset.from_list(MATH_ROWS), "test": Dataset.from_list(MATH_ROWS[:1])}).save_to_disk(saved)
    math = load_named_dataset("math_l3_5", path=str(saved))  # the source's split ("train") and its level filter
    assert math["answer"] == ["\\frac{3}{4}", "-\\sqrt{2}"]
    assert len(load_named_dataset("math_l3_5", path=str(saved), split="test")) == 1
    with pytest.raises(ValueError, match="no split 'validation'; it has train, test"):
        load_named_dataset("math_l3_5", path=str(saved), split="validation")


def test_local_copy_of_a_hub_repository(tmp_path):
    repo = tmp_path / "aime_2024"  # as `hf download HuggingFaceH4/aime_2024 --repo-type dataset` lays it out
    (repo / "data").mkdir(parents=True)
    rows = [{"id": 60, "problem": "Find $x$.", "solution": "...", "answer": "204", "url": "u", "year": "2024"}]
    Dataset.from_list(rows).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    aime = load_named_dataset("aime24", path=str(repo))
    assert aime[0]["answer"] == "204" and aime[0]["problem_id"] == "aime24/60"


def test_local_dataset_paths_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet: no such file or directory"):
        load_named_dataset("gsm8k", path=str(tmp_path / "nope.parquet"))
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown data file type; accepted: .parquet, .json, .jsonl, .csv, .arrow"):
        load_named_dataset("gsm8k", path=str(tmp_path / "rows.txt"))
    with pytest.raises(ValueError, match="toy_arithmetic is generated in code"):
        load_named_dataset("toy_arithmetic", path=str(tmp_path))
    assert parse_dataset_paths(["gsm8k=/d/g.jsonl", "aime24 = /d/a"]) == {"gsm8k": "/d/g.jsonl", "aime24": "/d/a"}
    assert parse_dataset_paths({"gsm8k": "/d/g.jsonl"}) == {"gsm8k": "/d/g.jsonl"}
    with pytest.raises(ValueError, match="not of the form NAME=PATH"):
        parse_dataset_paths(["gsm8k"])
    with pytest.raises(ValueError, match="given for 'gsm9k', which is not a dataset with files; accepted: aime24"):
        parse_dataset_paths(["gsm9k=/d"])
