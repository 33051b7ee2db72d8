"""Every YAML under recipes/ parses into its argument classes and passes their validation, without any download.

Training recipes go through the real parser (`TrlParser`, unknown keys are errors) into (`ScriptArguments`,
`BandGRPOConfig`, `ModelConfig`), whose `__post_init__` validates them. The one hardware-dependent check is bf16:
transformers refuses `bf16: true` on a machine without a GPU unless `use_cpu` is set, so GPU recipes are parsed
with `--use_cpu true` added on the command line and nothing else changed; the test then checks that every value
of the YAML file arrived unchanged. vLLM is only needed when the trainer starts, not by the config.
The paper's numbers are checked against docs/method.md §7.3, written out here.
"""

from __future__ import annotations

import glob
import os
import warnings
from enum import Enum

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from bandpo_trl.arguments import ScriptArguments, make_parser
from bandpo_trl.config import BandGRPOConfig, is_on_policy
from bandpo_trl.data import available_datasets
from bandpo_trl.rewards import available_rewards

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
RECIPES = os.path.join(ROOT, "recipes")
TRAINING_RECIPES = sorted(
    os.path.relpath(path, RECIPES)
    for path in glob.glob(os.path.join(RECIPES, "**", "*.yaml"), recursive=True)
    if "accelerate_configs" not in path
)
ACCELERATE_CONFIGS = sorted(glob.glob(os.path.join(RECIPES, "accelerate_configs", "*.yaml")))
PAPER_MODELS = {
    "Qwen2.5-3B-Instruct": "Qwen/Qwen2.5-3B-Instruct",
    "DeepSeek-R1-Distill-Qwen-1.5B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "DeepSeek-R1-Distill-Qwen-7B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "DeepSeek-R1-Distill-Llama-8B": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
}
PAPER_METHODS = {  # recipe path -> the keys that select the clipping rule
    "bandpo/config_kl.yaml": {
        "clip_rule": "band",
        "band_divergence": "kl",
        "band_delta": 0.05,
        "band_max_ratio": 10.0,
    },
    "bandpo/config_tv.yaml": {
        "clip_rule": "band",
        "band_divergence": "tv",
        "band_delta": 0.05,
        "band_max_ratio": 10.0,
    },
    "bandpo/config_chi2.yaml": {
        "clip_rule": "band",
        "band_divergence": "chi2",
        "band_delta": 0.05,
        "band_max_ratio": 10.0,
    },
    "grpo/config_clip.yaml": {"clip_rule": "clip", "epsilon": 0.2, "epsilon_high": 0.2},
    "clip_higher/config.yaml": {"clip_rule": "clip", "epsilon": 0.2, "epsilon_high": 0.28},
    "dcpo/config.yaml": {
        "clip_rule": "dcpo",
        "dcpo_epsilon_low": 0.16,
        "dcpo_epsilon_high": 0.2,
        "band_max_ratio": 10.0,
    },
    "bandpo/config_kl_lora.yaml": {"clip_rule": "band", "band_divergence": "kl", "band_delta": 0.05, "use_peft": True},
    # Generation by `trl vllm-serve` on 4 GPUs, training on the other 4 (recipes/README.md, "vLLM server mode").
    "bandpo/config_kl_vllm_server.yaml": {"clip_rule": "band", "band_divergence": "kl", "band_delta": 0.05},
}
# Keys a variant may change besides the clipping rule: where generation runs and the batch split that goes with it.
SERVER_KEYS = {
    "vllm_mode",
    "vllm_server_host",
    "vllm_server_port",
    "vllm_server_timeout",
    "vllm_tensor_parallel_size",
    "vllm_gpu_memory_utilization",
    "vllm_enable_sleep_mode",
    "gradient_accumulation_steps",
    "steps_per_generation",
}
CLIP_KEYS = {"clip_rule", "band_divergence", "band_delta", "band_max_ratio", "epsilon", "epsilon_high"}
CLIP_KEYS |= {"dcpo_epsilon_low", "dcpo_epsilon_high"}


def read_yaml(relpath: str) -> dict:
    with open(os.path.join(RECIPES, relpath)) as f:
        return yaml.safe_load(f)


def parse(relpath: str) -> tuple[ScriptArguments, BandGRPOConfig, object, object]:
    argv = ["--config", os.path.join(RECIPES, relpath)]
    if read_yaml(relpath).get("bf16"):
        argv += ["--use_cpu", "true"]  # the only override: bf16 needs a GPU or use_cpu (see module docstring)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_parser().parse_args_and_config(args=argv)


def plain(value):
    return value.value if isinstance(value, Enum) else value


@pytest.mark.parametrize("relpath", TRAINING_RECIPES)
def test_recipe_parses_validates_and_keeps_its_values(relpath):
    script_args, training_args, model_args, tiny_args = parse(relpath)
    assert isinstance(training_args, BandGRPOConfig)
    for key, expected in read_yaml(relpath).items():
        owner = next(a for a in (script_args, training_args, model_args, tiny_args) if hasattr(a, key))
        actual = plain(getattr(owner, key))
        if key == "report_to":
            assert actual in ([], "none", ["none"]) if expected == "none" else actual == expected
        else:
            assert actual == expected, key

    # Names resolve in the registries (a typo would otherwise only fail after the model is loaded).
    assert set(script_args.dataset_names) <= set(available_datasets())
    assert set(script_args.reward_funcs) <= set(available_rewards())
    assert set(script_args.eval_benchmarks) <= set(available_datasets())
    # Several optimizer steps per generation batch, or the clipping rule would be a no-op.
    assert training_args.steps_per_generation > training_args.gradient_accumulation_steps
    assert not is_on_policy(training_args)
    assert training_args.output_dir.startswith("outputs/")


def test_every_paper_recipe_exists():
    expected = {f"{model}/{method}" for model in PAPER_MODELS for method in PAPER_METHODS} | {
        "tiny/bandpo/config_kl.yaml"
    }
    assert expected <= set(TRAINING_RECIPES)


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
@pytest.mark.parametrize("method", sorted(PAPER_METHODS))
def test_paper_recipe_has_the_papers_hyperparameters(model, method):
    script_args, args, model_args, _ = parse(f"{model}/{method}")
    lora = method.endswith("_lora.yaml")
    server = method.endswith("_vllm_server.yaml")
    gpus = 1 if lora else 4 if server else 8  # the server variants train on 4 GPUs and generate on the other 4

    assert model_args.model_name_or_path == PAPER_MODELS[model]
    assert script_args.dataset_names == ["dapo_math_17k", "math_l3_5"]
    assert script_args.reward_funcs == ["math_accuracy"]
    assert script_args.max_prompt_length == 1024
    assert args.max_completion_length == 4096
    assert args.vllm_max_model_length >= 1024 + 4096
    assert (args.temperature, args.top_p, args.top_k) == (1.0, 1.0, 0)
    assert (args.loss_type, args.scale_rewards, args.beta, args.entropy_coef) == ("grpo", "group", 0.001, 0.0)
    assert args.delta == 10.0  # dual clip c = 10
    assert args.learning_rate == (1e-5 if lora else 1e-6)
    assert plain(args.lr_scheduler_type) == "constant"
    assert (args.warmup_steps, args.weight_decay, args.max_grad_norm) == (0, 0.01, 1.0)
    assert args.num_train_epochs == 10
    assert (args.use_vllm, args.vllm_mode, args.bf16) == (True, "server" if server else "colocate", True)
    assert model_args.dtype == "bfloat16"
    assert args.num_generations == 16

    # Completions per optimizer step and per generation batch on `gpus` processes.
    per_step = args.per_device_train_batch_size * gpus * args.gradient_accumulation_steps
    per_generation = args.per_device_train_batch_size * gpus * args.steps_per_generation
    if lora:
        assert (per_step, per_generation) == (256, 1024)  # a quarter of the paper's batch on one GPU
    else:
        assert (per_step, per_generation) == (1024, 4096)  # 64 and 256 prompts x 16
    assert args.steps_per_generation // args.gradient_accumulation_steps == 4
    assert args.steps_per_generation % args.gradient_accumulation_steps == 0

    for key, value in PAPER_METHODS[method].items():
        owner = model_args if key == "use_peft" else args
        assert getattr(owner, key) == value, key
    if lora:
        assert model_args.lora_target_modules and model_args.lora_r > 0


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
def test_recipes_of_one_model_differ_only_in_the_clipping_rule(model):
    reference = read_yaml(f"{model}/bandpo/config_kl.yaml")
    for method in PAPER_METHODS:
        if method.endswith("_lora.yaml"):
            continue
        other = read_yaml(f"{model}/{method}")
        differing = {k for k in set(reference) | set(other) if reference.get(k) != other.get(k)}
        allowed = SERVER_KEYS if method.endswith("_vllm_server.yaml") else CLIP_KEYS
        assert differing <= allowed | {"output_dir"}, (method, differing)


def test_tiny_recipe_runs_on_the_cpu_without_downloads():
    script_args, args, model_args, _ = parse("tiny/bandpo/config_kl.yaml")
    assert model_args.model_name_or_path == "tiny"
    assert script_args.dataset_names == ["toy_arithmetic"] and script_args.reward_funcs == ["toy_accuracy"]
    assert (args.bf16, args.use_cpu, args.use_vllm, args.gradient_checkpointing) == (False, True, False, False)
    assert args.report_to in ([], "none", ["none"])
    assert args.logging_steps <= 10
    assert args.output_dir == "outputs/tiny-bandpo-kl"  # what `make eval` reads
    assert (args.clip_rule, args.band_divergence, args.band_delta) == ("band", "kl", 0.05)


def test_unknown_recipe_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: tiny\nbf16: false\nband_dleta: 0.1\n")
    with pytest.raises(ValueError, match="band_dleta"):
        make_parser().parse_args_and_config(args=["--config", str(path)])


def test_command_line_overrides_the_recipe():
    _, args, *_ = make_parser().parse_args_and_config(
        args=[
            "--config",
            os.path.join(RECIPES, "tiny/bandpo/config_kl.yaml"),
            "--band_delta",
            "0.1",
            "--max_steps",
            "3",
        ]
    )
    assert (args.band_delta, args.max_steps) == (0.1, 3)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=os.path.basename)
def test_accelerate_config_loads(path):
    config = load_config_from_file(path)  # accelerate's own loader: unknown keys are errors
    name = os.path.basename(path)
    if name == "cpu.yaml":
        assert (config.use_cpu, config.num_processes, config.mixed_precision) == (True, 1, "no")
    elif name == "single_gpu.yaml":
        assert (config.use_cpu, config.num_processes, config.mixed_precision) == (False, 1, "bf16")
    else:
        assert (config.use_cpu, config.num_processes, config.mixed_precision) == (False, 8, "bf16")
    stages = {"zero2.yaml": 2, "zero3.yaml": 3}
    if name in stages:
        assert config.deepspeed_config["zero_stage"] == stages[name]
        assert "gradient_accumulation_steps" not in config.deepspeed_config  # the recipe sets it
    if name == "fsdp2.yaml":
        assert config.distributed_type == "FSDP"
        fsdp = config.fsdp_config
        assert (fsdp["fsdp_version"], fsdp["fsdp_auto_wrap_policy"]) == (2, "TRANSFORMER_BASED_WRAP")
        assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's bool form of FULL_SHARD
        assert fsdp["fsdp_activation_checkpointing"] is False  # the recipes' gradient_checkpointing does it
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # checkpoints `bandpo-eval` and vLLM can load
        # TRL's FSDP2 reference model would get no weights on ranks > 0 (see the comment in fsdp2.yaml).
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is False


def test_accelerate_configs_are_the_documented_ones():
    names = {os.path.basename(p) for p in ACCELERATE_CONFIGS}
    assert {"cpu.yaml", "ddp.yaml", "zero2.yaml", "zero3.yaml", "fsdp2.yaml"} <= names


def test_readme_has_a_launch_command_per_recipe():
    with open(os.path.join(RECIPES, "README.md")) as f:
        readme = f.read()
    for relpath in TRAINING_RECIPES:
        assert f"-m bandpo_trl.train --config recipes/{relpath}" in readme, relpath
