"""`bandpo-eval` end to end (`bandpo_trl.evaluation.cli`): tiny models that know the toy answers, evaluated through the
command line with real sampling, from flags or a YAML file, and the vLLM backend through a stand-in vLLM.

The "oracle" memorised the answers of the toy problems it is evaluated on, so mean@k = pass@k = 1 through real
sampling.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from eval_helpers import NUM_TOY, REPO_ROOT, install_stand_in_vllm, read_results, toy_cli_args, toy_problems

from bandpo_trl.evaluation import encode_prompt, main
from bandpo_trl.metrics import mean_at_k, problem_pass_at_k

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def test_cli_end_to_end_real_generation(oracle_model_dir, toy_pairs, tmp_path):
    """`python -m bandpo_trl.evaluation` in a subprocess, real sampling at temperature 1.0, the oracle model: 1.0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "bandpo_trl.evaluation", *toy_cli_args(oracle_model_dir, out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| benchmark | problems | samples | mean@4 (%) | pass@1 (%) | pass@4 (%) |" in proc.stdout
    assert "| toy_arithmetic | 2 | 8 | 100.00 | 100.00 | 100.00 |" in proc.stdout
    records, summary = read_results(out)
    assert [(r["prompt"], r["gold"]) for r in records] == toy_pairs
    assert [r["problem_id"] for r in records] == [f"toy_arithmetic/{p[:-1]}" for p, _ in toy_pairs]
    for record in records:
        assert record["completions"] == [record["gold"]] * 4 and record["answers"] == [record["gold"]] * 4
        assert record["correct"] == [True] * 4 and all(record["finished"])
    results = summary["results"]["toy_arithmetic"]
    assert results["mean@4"] == results["pass@4"] == results["pass@1"] == 1.0
    assert summary["backend"] == "transformers" and summary["config"]["temperature"] == 1.0


def test_cli_random_model_records_are_consistent_and_reproducible(tiny_model_dir, tmp_path, capsys):
    main(toy_cli_args(tiny_model_dir, tmp_path / "a"))
    # The same run from a YAML config (TrlParser's --config), one flag overriding it.
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\nbenchmarks: [toy_arithmetic]\nk: 4\npass_k: [1, 4]\nnum_problems: {NUM_TOY}\n"
        "max_new_tokens: 5\nbatch_size: 8\nseed: 0\nshow_progress: false\noutput_dir: elsewhere\n"
    )
    main(["--config", str(config), "--output_dir", str(tmp_path / "b")])
    assert "| toy_arithmetic | 2 | 8 |" in capsys.readouterr().out
    records, summary = read_results(tmp_path / "a")
    assert records == read_results(tmp_path / "b")[0]  # seeded
    assert len(records) == NUM_TOY and all(len(r["completions"]) == 4 for r in records)
    results = summary["results"]["toy_arithmetic"]
    assert results["mean@4"] == pytest.approx(mean_at_k([r["correct"] for r in records]))
    assert results["pass@4"] == pytest.approx(problem_pass_at_k([r["correct"] for r in records], 4))
    assert all(t <= 5 for r in records for t in r["completion_tokens"])


def test_vllm_backend_code_path_with_a_stand_in_vllm(oracle_model_dir, tmp_path, monkeypatch):
    """What the vLLM backend hands vLLM and how it reads the outputs, through the stand-in."""
    from transformers import AutoTokenizer

    toy_pairs_for_stub = list(zip(toy_problems()["prompt"], toy_problems()["answer"]))
    seen = install_stand_in_vllm(monkeypatch, answers=dict(toy_pairs_for_stub))
    main([*toy_cli_args(oracle_model_dir, tmp_path / "v"), "--backend", "auto"])
    records, summary = read_results(tmp_path / "v")
    assert summary["backend"] == "vllm" and summary["results"]["toy_arithmetic"]["mean@4"] == 1.0
    assert seen["llm"]["model"] == str(oracle_model_dir) and seen["llm"]["seed"] == 0
    assert seen["params"] == {"n": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": 5}
    tokenizer = AutoTokenizer.from_pretrained(oracle_model_dir)
    assert seen["prompts"] == [encode_prompt(tokenizer, p) for p, _ in toy_pairs_for_stub]
    assert seen["lora_requests"] == [None] and "enable_lora" not in seen["llm"]  # no adapter: no LoRA


def test_every_name_of_the_command_runs_the_same_main():
    """The installed `bandpo-eval`, `python -m bandpo_trl.evaluation` and the `python -m bandpo_trl.evaluate` alias all
    run `bandpo_trl.evaluation.cli.main` (tests/test_truthful_runs.py runs the installed script)."""
    from importlib.metadata import entry_points

    import bandpo_trl.evaluate
    import bandpo_trl.evaluation.__main__ as package_main
    from bandpo_trl.evaluation import cli

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "bandpo-eval"]
    assert script.value == "bandpo_trl.evaluation.cli:main"
    assert script.load() is cli.main is main is package_main.main is bandpo_trl.evaluate.main
