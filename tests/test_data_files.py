"""Local copies of the named datasets: a bad file or directory is refused with a message that names the file, the
dataset, what was found and what is expected, before any model is loaded; `dataset_paths` entries are checked
against the datasets the run uses."""

from __future__ import annotations

import json
import warnings

import pytest
from datasets import Dataset

from bandpo_trl.arguments import ScriptArguments
from bandpo_trl.data import load_named_dataset, parse_dataset_paths

GSM8K_ROWS = [
    {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
        "answer": "48/2 = 24\n#### 72",
    },
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
]
MATH_ROWS = [
    {"problem": "Compute $1+1$.", "level": "Level 1", "type": "Algebra", "solution": "$\\boxed{2}$"},
    {"problem": "Compute $2+2$.", "level": "Level 2", "type": "Algebra", "solution": "$\\boxed{4}$"},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# -------------------------------------------------------------------------------------------- files


def test_an_empty_jsonl_file_names_the_file_the_dataset_and_the_expected_columns(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("")
    with pytest.raises(ValueError) as error:
        load_named_dataset("gsm8k", path=str(path))
    message = str(error.value)
    assert str(path) in message and "gsm8k" in message and "empty" in message
    assert "question" in message and "answer" in message


def test_an_empty_csv_file_names_the_file_and_the_expected_columns(tmp_path):
    path = tmp_path / "gsm8k.csv"
    path.write_text("")
    with pytest.raises(ValueError, match=r"gsm8k\.csv \(gsm8k\): the file is empty.*question.*answer"):
        load_named_dataset("gsm8k", path=str(path))


def test_a_header_only_csv_has_no_rows(tmp_path):
    path = tmp_path / "gsm8k.csv"
    path.write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"gsm8k\.csv \(gsm8k\): no rows"):
        load_named_dataset("gsm8k", path=str(path))


def test_a_file_that_is_not_what_its_extension_says_names_the_file(tmp_path):
    path = tmp_path / "gsm8k.parquet"
    path.write_text("question,answer\nq,#### 1\n")
    with pytest.raises(ValueError, match=r"gsm8k\.parquet \(gsm8k\): cannot be read as a parquet file"):
        load_named_dataset("gsm8k", path=str(path))


def test_missing_columns_are_named_with_the_columns_found_and_expected(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "q", "solution": "#### 3"}])
    with pytest.raises(ValueError) as error:
        load_named_dataset("gsm8k", path=path)
    message = str(error.value)
    assert path in message and "(gsm8k)" in message
    assert "missing the column 'answer'" in message
    assert "found: question, solution" in message
    assert "openai/gsm8k" in message  # the layout expected
    assert "KeyError" not in message


def test_a_null_question_names_the_rows(tmp_path):
    rows = [*GSM8K_ROWS, {"question": None, "answer": "#### 3"}, {"question": None, "answer": "#### 4"}]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    with pytest.raises(
        ValueError, match=r"gsm8k\.jsonl \(gsm8k\): column 'question' is empty \(null\) in 2 of 4 rows"
    ):
        load_named_dataset("gsm8k", path=path)


def test_a_numeric_gsm8k_answer_is_refused_with_the_layout_expected(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [*GSM8K_ROWS, {"question": "q", "answer": 72}])
    with pytest.raises(ValueError) as error:
        load_named_dataset("gsm8k", path=path)
    message = str(error.value)
    assert "column 'answer'" in message and "row 2" in message and "72 (int)" in message
    assert "#### <final answer>" in message


def test_a_gsm8k_answer_without_the_final_answer_line_is_refused(tmp_path):
    # The whole solution would otherwise become the gold answer, and every completion would score as wrong.
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [*GSM8K_ROWS, {"question": "q", "answer": "It is 72."}])
    with pytest.raises(ValueError, match=r"column 'answer'.*row 2.*'It is 72\.'.*#### <final answer>"):
        load_named_dataset("gsm8k", path=path)


def test_numbers_are_accepted_where_a_source_stores_them(tmp_path):
    rows = [{"id": 1, "problem": "Find $x$.", "answer": 204}, {"id": 2, "problem": "Find $y$.", "answer": "7"}]
    aime = load_named_dataset("aime24", path=write_jsonl(tmp_path / "aime.jsonl", rows))
    assert list(aime["answer"]) == ["204", "7"] and list(aime["problem_id"]) == ["aime24/1", "aime24/2"]


def test_a_math_copy_without_training_levels_says_what_levels_it_has(tmp_path):
    path = tmp_path / "math.parquet"
    Dataset.from_list(MATH_ROWS).to_parquet(str(path))
    with pytest.raises(ValueError) as error:
        load_named_dataset("math_l3_5", path=str(path))
    message = str(error.value)
    assert str(path) in message and "(math_l3_5)" in message
    assert "none of its 2 rows" in message and "'Level 1', 'Level 2'" in message
    assert "Level 3" in message and "Column 'prompt'" not in message


# -------------------------------------------------------------------------------------------- directories


def test_a_directory_of_parquet_files_without_a_readme(tmp_path):
    directory = tmp_path / "gsm8k"
    directory.mkdir()
    Dataset.from_list(GSM8K_ROWS).to_parquet(str(directory / "part-0.parquet"))
    Dataset.from_list(GSM8K_ROWS[:1]).to_parquet(str(directory / "part-1.parquet"))
    gsm8k = load_named_dataset("gsm8k", path=str(directory))
    assert sorted(gsm8k["answer"]) == ["5", "72", "72"]


def test_a_directory_with_a_split_per_file_gives_the_source_split(tmp_path):
    directory = tmp_path / "gsm8k"
    (directory / "main").mkdir(parents=True)
    (directory / "socratic").mkdir(parents=True)
    Dataset.from_list(GSM8K_ROWS).to_parquet(str(directory / "main" / "train-00000-of-00001.parquet"))
    Dataset.from_list(GSM8K_ROWS[:1]).to_parquet(str(directory / "main" / "test-00000-of-00001.parquet"))
    Dataset.from_list(GSM8K_ROWS[:1]).to_parquet(str(directory / "socratic" / "train-00000-of-00001.parquet"))
    # The source's config ("main") is a subdirectory; its train split is the one the name stands for.
    assert list(load_named_dataset("gsm8k", path=str(directory))["answer"]) == ["72", "5"]
    assert list(load_named_dataset("gsm8k", path=str(directory), split="test")["answer"]) == ["72"]
    with pytest.raises(ValueError, match=r"\(gsm8k\): no split 'validation'; it has (train, test|test, train)"):
        load_named_dataset("gsm8k", path=str(directory), split="validation")


def test_a_directory_without_data_files_lists_what_it_holds(tmp_path):
    directory = tmp_path / "gsm8k"
    directory.mkdir()
    (directory / "notes.txt").write_text("x")
    (directory / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError) as error:
        load_named_dataset("gsm8k", path=str(directory))
    message = str(error.value)
    assert str(directory) in message and "(gsm8k)" in message
    assert "no data files" in message and "model.bin, notes.txt" in message
    assert ".parquet" in message and "save_to_disk" in message
    assert "BuilderConfig" not in message


def test_a_hub_copy_whose_readme_lacks_the_config(tmp_path):
    directory = tmp_path / "gsm8k"
    directory.mkdir()
    (directory / "README.md").write_text(
        "---\nconfigs:\n- config_name: socratic\n  data_files:\n  - split: train\n    path: socratic/train-*\n---\n"
    )
    with pytest.raises(ValueError, match=r"\(gsm8k\): its README\.md declares the config\(s\) socratic, not 'main'"):
        load_named_dataset("gsm8k", path=str(directory))


# -------------------------------------------------------------------------------------------- dataset_paths


def test_duplicate_dataset_paths_entries_are_refused():
    with pytest.raises(ValueError, match=r"gsm8k is given twice.*'gsm8k=/a\.jsonl'.*'gsm8k=/b\.jsonl'"):
        parse_dataset_paths(["gsm8k=/a.jsonl", "gsm8k=/b.jsonl"])


def test_a_dataset_paths_entry_for_a_dataset_the_run_does_not_use_is_refused(tmp_path):
    data_file = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    with pytest.raises(ValueError) as error:
        ScriptArguments(dataset_paths=[f"gsm8k={data_file}"])  # trains on toy_arithmetic
    message = str(error.value)
    assert f"gsm8k={data_file}" in message and "does not use" in message and "toy_arithmetic" in message
    ScriptArguments(dataset_names=["gsm8k"], dataset_paths=[f"gsm8k={data_file}"])


def test_a_dataset_paths_entry_for_an_evaluated_benchmark_is_used(tmp_path):
    data_file = write_jsonl(tmp_path / "aime.jsonl", [{"id": 1, "problem": "p", "answer": "1"}])
    ScriptArguments(eval_benchmarks=["aime24"], eval_every_steps=5, dataset_paths=[f"aime24={data_file}"])
    # With eval_every_steps=0 no benchmark is evaluated, so the path would be ignored.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"aime24=.*eval_every_steps=0"):
            ScriptArguments(eval_benchmarks=["aime24"], eval_every_steps=0, dataset_paths=[f"aime24={data_file}"])


def test_a_missing_dataset_path_is_refused_at_argument_time(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=f"gsm8k={missing}: no such file or directory"):
        ScriptArguments(dataset_names=["gsm8k"], dataset_paths=[f"gsm8k={missing}"])
