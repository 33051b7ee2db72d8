"""The asynchronous recipe and its launch commands (recipes/README.md, "Asynchronous server mode"), checked with the
tools that would run them: accelerate's launcher, `bandpo_trl.train_async`'s `TrlParser`, `trl vllm-serve`'s parser.
Then the recipe trains two steps on the CPU through the entry point, with the in-process stand-ins for the vLLM
server (bandpo_trl.stale_rollouts) in place of TRL's rollout worker and weight transfer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import warnings

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from datasets import Dataset
from test_run_safety import write_checkpoint  # a complete checkpoint whose files load (tests/ is on sys.path)

from bandpo_trl import checkpoints, train_async
from bandpo_trl.async_config import BandAsyncGRPOConfig
from bandpo_trl.data import MATH_PROMPT_TEMPLATE
from bandpo_trl.stale_rollouts import SnapshotWeightTransfer, StaleRolloutWorker, cpu_async_grpo
from bandpo_trl.train_async import AsyncModelArguments, main, make_parser

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
RECIPE = "recipes/Qwen2.5-3B-Instruct/bandpo/config_kl_async.yaml"
MODEL, HEADS, KV_HEADS = "Qwen/Qwen2.5-3B-Instruct", 16, 2  # from the model's config.json
PAPER_STEP = 1024  # completions per optimizer step (docs/method.md §7.3): 64 prompts x 16


def read_yaml(path: str) -> dict:
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


def parse(argv: list[str]):
    """`bandpo_trl.train_async`'s parser (+ use_cpu: bf16 needs a GPU here): (script, training, model) arguments."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_parser().parse_args_and_config(args=[*argv, "--use_cpu", "true"])


def readme_commands(program: str) -> list[tuple[dict, list[str]]]:
    """The `program ...` commands of the README's asynchronous section: (environment assignments, arguments)."""
    with open(os.path.join(ROOT, "recipes", "README.md")) as f:
        text = f.read()
    section = text.split("## Asynchronous server mode", 1)[1].split("\n## ", 1)[0]
    commands = []
    for snippet in re.findall(r"`([^`\n]+)`", section):
        if snippet.split("=", 1)[0] == "CUDA_VISIBLE_DEVICES" and program in snippet:
            words = shlex.split(snippet)
            i = next(i for i in range(len(words)) if words[i : i + len(program.split())] == program.split())
            commands.append((dict(w.split("=", 1) for w in words[:i]), words[i + len(program.split()) :]))
    return commands


def test_recipe_parses_validates_and_keeps_its_values():
    script_args, args, model_args = parse(["--config", RECIPE])
    assert isinstance(args, BandAsyncGRPOConfig) and isinstance(model_args, AsyncModelArguments)
    for key, expected in read_yaml(RECIPE).items():
        owner = next(a for a in (script_args, args, model_args) if hasattr(a, key))
        actual = getattr(owner, key)
        actual = getattr(actual, "value", actual)
        if key == "report_to":
            assert actual in ([], "none", ["none"])
        else:
            assert actual == expected, key


def test_recipe_has_the_papers_hyperparameters_where_the_async_loss_has_them():
    script_args, args, model_args = parse(["--config", RECIPE])
    assert model_args.model_name_or_path == MODEL
    assert (args.clip_rule, args.band_divergence, args.band_delta, args.band_max_ratio) == ("band", "kl", 0.05, 10.0)
    assert script_args.dataset_names == ["dapo_math_17k", "math_l3_5"]
    assert script_args.reward_funcs == ["math_accuracy"] and script_args.max_prompt_length == 1024
    assert args.max_completion_length == 4096 and args.num_generations == 16
    assert (args.temperature, args.top_p, args.top_k) == (1.0, 1.0, 0)
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (1e-6, "constant", 0)
    assert (args.weight_decay, args.max_grad_norm, args.num_train_epochs) == (0.01, 1.0, 10)
    assert args.bf16 and args.dtype == "float32"  # bf16 compute, float32 weights (a 1e-6 update survives)
    assert (args.weight_sync_steps, args.max_staleness) == (1, 4)
    assert args.token_budget == 0  # a fixed number of completions per micro-step: the batch below is exact
    assert script_args.eval_every_steps == 0
    assert args.output_dir.startswith("outputs/")


def test_readme_commands_split_one_node_and_keep_the_papers_batch():
    ((server_env, server_argv),) = readme_commands("trl vllm-serve")
    ((train_env, train_argv),) = readme_commands("accelerate launch")
    from trl.scripts.vllm_serve import make_parser as make_serve_parser

    server, extra = make_serve_parser().parse_args_and_config(args=server_argv, return_remaining_strings=True)
    assert not extra and server.model == MODEL
    assert server.max_model_len >= 1024 + 4096
    assert server.data_parallel_size == 1  # TRL 1.16's server refuses data parallel > 1 for dense models
    assert HEADS % server.tensor_parallel_size == 0 and server.tensor_parallel_size % KV_HEADS == 0
    assert len(server_env["CUDA_VISIBLE_DEVICES"].split(",")) == server.tensor_parallel_size

    launch = launch_command_parser().parse_args(train_argv)
    launch, _, _ = _validate_launch_command(launch)
    assert launch.module and launch.training_script == "bandpo_trl.train_async"
    _, args, _ = parse(launch.training_script_args)
    assert launch.training_script_args[launch.training_script_args.index("--config") + 1] == RECIPE
    # TRL's asynchronous trainer shards with FSDP2 only.
    accelerate_config = load_config_from_file(launch.config_file)
    assert accelerate_config.distributed_type.value == "FSDP" and accelerate_config.fsdp_config["fsdp_version"] == 2
    assert launch.use_fsdp

    server_gpus = set(server_env["CUDA_VISIBLE_DEVICES"].split(","))
    train_gpus = set(train_env["CUDA_VISIBLE_DEVICES"].split(","))
    assert not server_gpus & train_gpus and len(server_gpus | train_gpus) == 8
    assert len(train_gpus) == launch.num_processes == 4
    assert args.vllm_server_base_url == f"http://127.0.0.1:{server.port}"
    assert args.vllm_server_timeout >= 600
    # Completions per optimizer step: per micro-step (fixed with token_budget 0) x accumulation steps.
    assert args.per_device_train_batch_size * launch.num_processes * args.gradient_accumulation_steps == PAPER_STEP
    # A micro-step holds whole groups (TRL splits a micro-batch over the processes by group).
    assert (args.per_device_train_batch_size * launch.num_processes) % args.num_generations == 0


def test_refusals_before_anything_is_loaded(tmp_path):
    base = ["--config", RECIPE, "--output_dir", str(tmp_path)]
    for extra, match in (
        (["--model_name_or_path", "tiny"], r"model_name_or_path=tiny .* Train it with `python -m bandpo_trl.train`"),
        (["--eval_every_steps", "10"], r"eval_every_steps=10: in-training evaluation is not available"),
        (["--dataset_names", "nope"], r"Unknown dataset 'nope'"),
    ):
        with pytest.raises(ValueError, match=match):
            main([*base, *extra, "--use_cpu", "true"])


class ReachedTokenizerLoad(Exception):
    """Raised where the entry point would load the tokenizer: every check before it passed."""


def test_a_used_output_dir_and_a_changed_clip_rule_are_refused_before_anything_is_loaded(tmp_path, monkeypatch):
    def reached(*args, **kwargs):
        raise ReachedTokenizerLoad

    monkeypatch.setattr(train_async, "load_tokenizer", reached)
    out = tmp_path / "run"
    base = ["--config", RECIPE, "--output_dir", str(out), "--use_cpu", "true"]
    write_checkpoint(out, 4, settings=checkpoints.clip_settings(parse(base)[1]))
    with pytest.raises(ValueError, match=r"already holds the outputs of an earlier run \(checkpoint-4\)"):
        main(base)
    resume = [*base, "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match=r"other clip settings: clip_rule 'band' -> 'clip'"):
        main([*resume, "--clip_rule", "clip"])
    with pytest.raises(ReachedTokenizerLoad):
        main(resume)
    with pytest.raises(ReachedTokenizerLoad):
        main([*base, "--overwrite_output_dir", "true"])
    assert not (out / "checkpoint-4").exists()


def test_plain_text_prompts_are_refused(tiny_model_dir, tmp_path):
    argv = ["--config", RECIPE, "--model_name_or_path", str(tiny_model_dir), "--dataset_names", "toy_arithmetic"]
    argv += ["--reward_funcs", "toy_accuracy", "--output_dir", str(tmp_path), "--use_cpu", "true"]
    with pytest.raises(ValueError, match=r"plain text, but TRL's asynchronous rollout worker renders conversations"):
        main(argv)


@pytest.fixture
def math_files(tmp_path):
    """The two training sets as local files with the sources' columns (`--dataset_paths NAME=PATH`)."""
    head, tail = MATH_PROMPT_TEMPLATE.split("{problem}")
    problems = [
        ("What is $2+3$?", "5"),
        ("What is $7-4$?", "3"),
        ("What is $2 \\cdot 4$?", "8"),
        ("What is $9-9$?", "0"),
    ]
    dapo = [
        {"prompt": head + p + tail, "solution": a, "extra_info": {"index": f"id-{i}"}}
        for i, (p, a) in enumerate(problems)
    ]
    math = [{"problem": "What is $1+1$?", "level": "Level 3", "type": "Algebra", "solution": "$\\boxed{2}$"}]
    Dataset.from_list(dapo).to_parquet(str(tmp_path / "dapo.parquet"))
    Dataset.from_list(math).to_parquet(str(tmp_path / "math.parquet"))
    return [f"dapo_math_17k={tmp_path / 'dapo.parquet'}", f"math_l3_5={tmp_path / 'math.parquet'}"]


@pytest.mark.slow
def test_recipe_trains_two_steps_on_the_cpu(tiny_model_dir, math_files, tmp_path, monkeypatch):
    """The recipe through `bandpo_trl.train_async.main`, as written except what a CPU run must change (the model, the
    batch, the lengths, two steps), with TRL's rollout worker and weight transfer replaced by the stand-ins."""
    import trl.experimental.async_grpo.async_grpo_trainer as trl_async

    transfer = SnapshotWeightTransfer()
    built = {}

    class Worker(StaleRolloutWorker):
        _loop_kwargs = {}  # read by TRL's trainer for checkpoints and resumption

        def __init__(self, *, model_name, dataset, reward_funcs, processing_class, num_generations, max_tokens, **kw):
            def reward(prompts, completions, **columns):
                scores = [f(prompts=prompts, completions=completions, **columns) for f in reward_funcs]
                return [sum(values) for values in zip(*scores, strict=True)]

            super().__init__(
                model_name,
                processing_class,
                dataset,
                transfer,
                staleness=1,
                num_generations=num_generations,
                max_completion_length=max_tokens,
                temperature=kw["temperature"],
                reward_func=reward,
            )
            built.update(worker=self, reward_funcs=reward_funcs, dataset=dataset)

    monkeypatch.setattr(trl_async, "AsyncRolloutWorker", Worker)
    monkeypatch.setattr(trl_async, "WeightTransferClient", lambda **kwargs: transfer)
    out = tmp_path / "out"
    argv = ["--config", RECIPE, "--model_name_or_path", str(tiny_model_dir), "--dataset_paths", *math_files]
    argv += ["--output_dir", str(out), "--use_cpu", "true", "--max_steps", "2", "--max_completion_length", "8"]
    argv += ["--per_device_train_batch_size", "4", "--num_generations", "2", "--gradient_accumulation_steps", "2"]
    argv += ["--save_steps", "2"]
    with cpu_async_grpo(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0

    assert [f.__name__ for f in built["reward_funcs"]] == ["math_accuracy_reward"]
    assert len(built["dataset"]) == 5 and isinstance(built["dataset"][0]["prompt"], list)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logs = [h for h in state["log_history"] if "loss" in h]
    assert len(logs) == 2 and all("band/upper_mean" in h and "band/staleness/1" in h for h in logs)
    assert logs[-1]["band/staleness/1"] == 1.0  # the second step's samples come from the first version
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    recorded = json.loads((out / "checkpoint-2" / checkpoints.CLIP_SETTINGS_NAME).read_text())
    assert recorded["clip_rule"] == "band" and recorded["band_divergence"] == "kl"
