"""`bandpo-eval` and the in-training evaluation check their inputs before generating: benchmarks read from local
copies (`dataset_paths`), the output directory writable, the model and its adapter's base present; results are
written atomically, and a benchmark that fails leaves the finished ones with their summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_truthful_runs import USER_RECIPE, run_script

from bandpo_trl.evaluation import BenchmarkEvalCallback, Completion, EvalArguments, run_evaluation, write_jsonl
from bandpo_trl.tiny import build_tiny_tokenizer

AIME_ROWS = [
    {"id": 60, "problem": "Find the least $n$ with $n > 203$.", "solution": "...", "answer": "204"},
    {"id": 61, "problem": "Find $2 + 5$.", "solution": "...", "answer": "7"},
]


def aime_file(directory: Path) -> str:
    path = directory / "aime.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in AIME_ROWS))
    return str(path)


class ConstantGenerator:
    """Answers every prompt with the same text; records its calls; raises on the call numbered `fail_on`."""

    def __init__(self, text: str = "Answer: 204", fail_on: int | None = None):
        self.text, self.fail_on, self.calls = text, fail_on, 0

    def generate(self, prompts, n, desc=None):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("CUDA out of memory (stand-in)")
        return [[Completion(text=self.text, num_tokens=3, finished=True)] * n for _ in prompts]


def args(tmp_path, **kwargs) -> EvalArguments:
    values = dict(model="unused", benchmarks=["aime24"], k=2, output_dir=str(tmp_path / "eval"), show_progress=False)
    values.update(kwargs)
    return EvalArguments(**values)


# -------------------------------------------------------------------------------------------- local benchmarks


def test_bandpo_eval_reads_a_benchmark_from_its_local_copy(tmp_path):
    data = aime_file(tmp_path)
    summary = run_evaluation(
        args(tmp_path, dataset_paths=[f"aime24={data}"]),
        generator=ConstantGenerator(),
        tokenizer=build_tiny_tokenizer(),
    )
    metrics = summary["results"]["aime24"]
    assert metrics["num_problems"] == 2 and metrics["mean@2"] == pytest.approx(0.5)  # 204 is right for problem 60 only
    records = [json.loads(line) for line in (tmp_path / "eval" / "aime24.jsonl").read_text().splitlines()]
    assert [r["problem_id"] for r in records] == ["aime24/60", "aime24/61"]


def test_bandpo_eval_refuses_a_path_for_a_benchmark_it_does_not_evaluate(tmp_path):
    data = aime_file(tmp_path)
    with pytest.raises(
        ValueError, match=rf"'aime24={data}' is for a dataset this run does not use: it evaluates amc23"
    ):
        args(tmp_path, benchmarks=["amc23"], dataset_paths=[f"aime24={data}"])
    with pytest.raises(ValueError, match="aime24 is given twice"):
        args(tmp_path, dataset_paths=[f"aime24={data}", f"aime24={data}"])


def test_a_benchmark_without_hub_access_or_local_copy_says_how_to_give_one(tmp_path, monkeypatch):
    import bandpo_trl.data as data

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/aime_2024' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(data, "load_dataset", offline)
    generator = ConstantGenerator()
    with pytest.raises(
        RuntimeError, match=r"aime24: cannot load HuggingFaceH4/aime_2024.*--dataset_paths aime24=PATH"
    ):
        run_evaluation(args(tmp_path), generator=generator, tokenizer=build_tiny_tokenizer())
    assert generator.calls == 0


def test_the_in_training_evaluation_reads_the_run_dataset_paths(tmp_path):
    callback = BenchmarkEvalCallback(["aime24"], every_n_steps=1, dataset_paths={"aime24": aime_file(tmp_path)})
    [dataset] = callback.load_datasets()
    assert list(dataset["problem_id"]) == ["aime24/60", "aime24/61"]


class _Built(Exception):
    pass


def test_train_hands_its_dataset_paths_to_the_in_training_evaluation_and_reads_them_before_the_model(
    tmp_path, monkeypatch
):
    from bandpo_trl import train as train_module
    from bandpo_trl.arguments import make_parser

    data = aime_file(tmp_path)
    flags = ["--eval_benchmarks", "aime24", "--eval_every_steps", "1", "--output_dir", str(tmp_path / "run")]
    built = {}

    def fake_trainer(*, callbacks, **kwargs):
        built["callbacks"] = callbacks
        raise _Built

    monkeypatch.setattr(train_module, "resolve_model_name", lambda *a, **k: str(tmp_path / "no-model"))
    monkeypatch.setattr(train_module, "load_tokenizer", lambda *a, **k: build_tiny_tokenizer())
    parsed = make_parser().parse_args_and_config(args=[*flags, "--dataset_paths", f"aime24={data}"])
    with pytest.raises(_Built):
        train_module.train(*parsed, trainer_cls=fake_trainer)
    [callback] = built["callbacks"]
    assert list(callback.load_datasets()[0]["problem_id"]) == ["aime24/60", "aime24/61"]

    # A bad benchmark file is refused before any model is built or loaded.
    (tmp_path / "empty.jsonl").write_text("")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data were checked")

    monkeypatch.setattr(train_module, "resolve_model_name", no_model)
    parsed = make_parser().parse_args_and_config(
        args=[*flags, "--dataset_paths", f"aime24={tmp_path / 'empty.jsonl'}"]
    )
    with pytest.raises(ValueError, match=r"empty\.jsonl \(aime24\): the file is empty"):
        train_module.train(*parsed, trainer_cls=fake_trainer)


@pytest.mark.slow
def test_offline_training_with_in_training_evaluation_on_a_local_benchmark(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(USER_RECIPE.replace("max_steps: 4", "max_steps: 2"))
    out = tmp_path / "run"
    result = run_script(
        "bandpo-train", "--config", str(recipe), "--output_dir", str(out), "--eval_benchmarks", "aime24",
        "--eval_every_steps", "1", "--eval_k", "2", "--dataset_paths", f"aime24={aime_file(tmp_path)}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ConnectionError" not in result.stderr
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval/aime24/mean@2" in entry] == [1, 2]
    records = (out / "benchmark_eval" / "step-2" / "aime24.jsonl").read_text().splitlines()
    assert [json.loads(line)["problem_id"] for line in records] == ["aime24/60", "aime24/61"]


@pytest.mark.slow
def test_installed_bandpo_eval_offline_with_a_local_benchmark(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    result = run_script(
        "bandpo-eval", "--model", str(tiny_model_dir), "--benchmarks", "aime24", "--dataset_paths",
        f"aime24={aime_file(tmp_path)}", "--k", "1", "--max_new_tokens", "2", "--output_dir", str(out),
        "--torch_num_threads", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["results"]["aime24"]["num_problems"] == 2


# -------------------------------------------------------------------------------------------- output directory


def output_dirs_that_cannot_be_written(tmp_path) -> list[Path]:
    (tmp_path / "a-file").write_text("x")
    dirs = [tmp_path / "a-file" / "eval"]
    if os.path.isdir("/proc"):
        dirs.append(Path("/proc/x"))
    return dirs


def test_the_output_directory_is_checked_before_generating(tmp_path):
    for output_dir in output_dirs_that_cannot_be_written(tmp_path):
        generator = ConstantGenerator()
        with pytest.raises(OSError, match=f"--output_dir {output_dir}: cannot write results there"):
            run_evaluation(
                args(tmp_path, benchmarks=["toy_arithmetic"], num_problems=2, output_dir=str(output_dir)),
                generator=generator,
                tokenizer=build_tiny_tokenizer(),
            )
        assert generator.calls == 0


def test_the_output_directory_check_leaves_nothing_behind(tmp_path):
    out = tmp_path / "new" / "eval"
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        run_evaluation(
            args(tmp_path, benchmarks=["toy_arithmetic"], num_problems=2, output_dir=str(out)),
            generator=ConstantGenerator(fail_on=1),
            tokenizer=build_tiny_tokenizer(),
        )
    assert json.loads((out / "summary.json").read_text())["failed"].keys() == {"toy_arithmetic"}
    (tmp_path / "model").mkdir()  # a model directory with no model: refused before any output is created
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_evaluation(args(tmp_path, model=str(tmp_path / "model"), output_dir=str(tmp_path / "other" / "eval")))
    assert not (tmp_path / "other").exists()


def test_installed_bandpo_eval_checks_the_output_directory_first(tmp_path, tiny_model_dir):
    for output_dir in output_dirs_that_cannot_be_written(tmp_path):
        result = run_script(
            "bandpo-eval", "--model", str(tiny_model_dir), "--benchmarks", "toy_arithmetic", "--num_problems", "2",
            "--k", "1", "--max_new_tokens", "2", "--output_dir", str(output_dir), "--torch_num_threads", "1",
        )  # fmt: skip
        assert result.returncode != 0
        assert f"--output_dir {output_dir}: cannot write results there" in result.stderr
        assert "toy_arithmetic: sampling" not in result.stderr  # nothing was generated


def test_a_failing_benchmark_keeps_the_finished_ones_and_says_what_failed(tmp_path):
    out = tmp_path / "eval"
    amc = tmp_path / "amc.jsonl"
    amc.write_text(json.dumps({"question": "Find $3 + 4$.", "answer": 7.0}) + "\n")
    paths = [f"aime24={aime_file(tmp_path)}", f"amc23={amc}"]
    with pytest.raises(RuntimeError) as error:
        run_evaluation(
            args(
                tmp_path,
                benchmarks=["toy_arithmetic", "aime24", "amc23"],
                num_problems=2,
                dataset_paths=paths,
                output_dir=str(out),
            ),  # fmt: skip
            generator=ConstantGenerator(text="Answer: 7", fail_on=2),
            tokenizer=build_tiny_tokenizer(),
        )
    message = str(error.value)
    assert "1 of 3 benchmarks failed: aime24: RuntimeError: CUDA out of memory (stand-in)" in message
    assert "Finished: toy_arithmetic, amc23" in message and str(out / "summary.json") in message
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"toy_arithmetic", "amc23"}  # the benchmarks after the failure still ran
    assert summary["results"]["amc23"]["mean@2"] == 1.0
    assert summary["failed"] == {"aime24": "RuntimeError: CUDA out of memory (stand-in)"}
    assert (out / "toy_arithmetic.jsonl").is_file() and not (out / "aime24.jsonl").exists()


def test_math500_without_a_local_copy_is_refused_before_generating(tmp_path, monkeypatch):
    import bandpo_trl.data as data

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(data, "load_dataset", offline)
    generator = ConstantGenerator()
    with pytest.raises(RuntimeError, match="math500: cannot load"):
        run_evaluation(
            args(tmp_path, benchmarks=["toy_arithmetic", "math500"], num_problems=2),
            generator=generator,
            tokenizer=build_tiny_tokenizer(),
        )
    assert generator.calls == 0 and not (tmp_path / "eval").exists()


def test_result_files_are_written_atomically(tmp_path):
    path = tmp_path / "aime24.jsonl"
    write_jsonl(str(path), [{"a": 1}])

    def records():
        yield {"a": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_jsonl(str(path), records())
    assert path.read_text() == '{"a": 1}\n'  # the previous file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aime24.jsonl"]  # no temporary file left


# -------------------------------------------------------------------------------------------- adapters


def test_an_adapter_whose_local_base_model_moved_names_both(tmp_path):
    adapter = tmp_path / "lora"
    adapter.mkdir()
    moved = tmp_path / "gone" / "base"
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(moved), "r": 8, "target_modules": ["q_proj"]})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        run_evaluation(args(tmp_path, model=str(adapter), benchmarks=["toy_arithmetic"]))
    message = str(error.value)
    assert str(adapter) in message and str(moved) in message and "--adapter" in message
    assert "Repo id must be" not in message
