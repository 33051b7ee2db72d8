"""Scale-out configuration, checked without GPUs: the paper's batch for every recipe on every launch it is meant for.

Every launch is parsed by the tools that would run it: accelerate's own `accelerate launch` parser and validation
(with the accelerate config file, its --num_processes / --num_machines overrides), TRL's `TrlParser` for the training
arguments after `-m bandpo_trl.train` (the recipe plus any overrides), TRL's `trl vllm-serve` parser for the server.
Launches come from three places: the commands written in recipes/README.md, the commands `slurm/train.slurm` builds
for N nodes (run in its dry-run mode with a stand-in `scontrol`), and the table of batch arithmetic in the README.
The paper's batch (docs/method.md §7.3): 1024 completions (64 prompts x 16) per optimizer step, 4096 (256 x 16) per
generation batch, so 4 optimizer steps per generation batch; the one-GPU LoRA recipes use a quarter of it.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings

import pytest
import yaml
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import _filter_args, prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from torch.distributed.run import get_args_parser as torchrun_parser
from torch.distributed.run import get_rdzv_endpoint
from trl import ModelConfig

from bandpo_trl.arguments import make_parser
from bandpo_trl.config import BandGRPOConfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
RECIPES = os.path.join(ROOT, "recipes")
README = os.path.join(RECIPES, "README.md")
SLURM = os.path.join(ROOT, "slurm", "train.slurm")
CONFIGS = os.path.join(RECIPES, "accelerate_configs")

PAPER_STEP, PAPER_GENERATION = 1024, 4096  # completions per optimizer step and per generation batch
LORA_STEP, LORA_GENERATION = 256, 1024  # a quarter of it on one GPU
MODELS = {  # recipe folder -> (Hub id, attention heads, key/value heads), from each model's config.json
    "DeepSeek-R1-Distill-Qwen-1.5B": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 12, 2),
    "Qwen2.5-3B-Instruct": ("Qwen/Qwen2.5-3B-Instruct", 16, 2),
    "DeepSeek-R1-Distill-Qwen-7B": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 28, 4),
    "DeepSeek-R1-Distill-Llama-8B": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 32, 8),
}
LARGE = {"DeepSeek-R1-Distill-Qwen-7B", "DeepSeek-R1-Distill-Llama-8B"}
COLOCATE_METHODS = [
    "bandpo/config_kl.yaml",
    "bandpo/config_tv.yaml",
    "bandpo/config_chi2.yaml",
    "grpo/config_clip.yaml",
    "clip_higher/config.yaml",
    "dcpo/config.yaml",
]
SERVER = "bandpo/config_kl_vllm_server.yaml"
LORA = "bandpo/config_kl_lora.yaml"


def meant_for(model: str) -> list[str]:
    """Accelerate configs each 8-GPU recipe of `model` is meant for: sharded ones only for the 7B/8B models."""
    return ["zero3", "fsdp2"] if model in LARGE else ["zero2", "zero3", "fsdp2", "ddp"]


def read_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def parse_training(argv: list[str]):
    """`bandpo_trl.train`'s parser on the arguments after `-m bandpo_trl.train` (+ use_cpu: bf16 needs a GPU here):
    (script arguments, BandGRPOConfig, ModelConfig)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = make_parser().parse_args_and_config(args=[*argv, "--use_cpu", "true"])
    return (
        parsed[0],
        next(a for a in parsed if isinstance(a, BandGRPOConfig)),
        next(a for a in parsed if isinstance(a, ModelConfig)),
    )


def parse_launch(argv: list[str]):
    """accelerate's parser and validation of `accelerate launch ARGV`: (launch args, training args, model args)."""
    args = launch_command_parser().parse_args(argv)
    args, _, _ = _validate_launch_command(args)
    assert args.module and args.training_script == "bandpo_trl.train", argv
    _, training_args, model_args = parse_training(args.training_script_args)
    return args, training_args, model_args


def torchrun_view(launch_args) -> tuple[dict, object]:
    """What `accelerate launch` hands torchrun on this node: (environment, torchrun's arguments), through the same
    functions accelerate's DeepSpeed and multi-GPU/FSDP launchers call."""
    if launch_args.use_deepspeed:
        launch_args.deepspeed_fields_from_accelerate_config = "zero_stage"  # what launch_command sets from the file
        _, env = prepare_deepspeed_cmd_env(launch_args)
    else:
        env = prepare_multi_gpu_env(launch_args)
    script = [
        "--training_script",
        launch_args.training_script,
        "--training_script_args",
        launch_args.training_script_args,
    ]
    return env, _filter_args(launch_args, torchrun_parser(), script)


def batch(launch_args, training_args) -> tuple[int, int, float]:
    """(completions per optimizer step, per generation batch, optimizer steps per generation batch)."""
    per_micro_step = training_args.per_device_train_batch_size * launch_args.num_processes
    return (
        per_micro_step * training_args.gradient_accumulation_steps,
        per_micro_step * training_args.steps_per_generation,
        training_args.steps_per_generation / training_args.gradient_accumulation_steps,
    )


def assert_papers_batch(launch_args, training_args, lora=False):
    expected = (LORA_STEP, LORA_GENERATION, 4) if lora else (PAPER_STEP, PAPER_GENERATION, 4)
    assert batch(launch_args, training_args) == expected
    # TRL's own constraint: the generation batch splits into whole groups of num_generations completions.
    assert batch(launch_args, training_args)[1] % training_args.num_generations == 0


def model_folder(recipe_path: str) -> str:
    return os.path.relpath(recipe_path, RECIPES).split(os.sep)[0]


def assert_valid_tensor_parallel(model: str, tp: int):
    """vLLM splits attention heads over the tensor-parallel ranks; key/value heads are split or replicated."""
    _, heads, kv_heads = MODELS[model]
    assert heads % tp == 0, (model, tp)
    assert (kv_heads % tp == 0) if kv_heads >= tp else (tp % kv_heads == 0), (model, tp)


# ---------------------------------------------------------------------------------------------------------------------
# Commands written in recipes/README.md


def readme_text() -> str:
    with open(README) as f:
        return f.read()


def readme_commands(program: str) -> list[tuple[dict, list[str]]]:
    """Every `program ...` command in the README (code blocks, with line continuations, and `inline` table cells):
    (environment assignments written before it, its arguments)."""
    text = readme_text().replace("\\\n", " ")
    commands = []
    for snippet in re.findall(r"`([^`\n]+)`", text) + [
        line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
    ]:
        for part in snippet.split("&&"):
            if program not in part or "<" in part:  # "<" marks a template, e.g. --config recipes/<Model>/...
                continue
            words = shlex.split(part.split(" #")[0])
            n = len(program.split())
            for i in range(len(words) - n + 1):
                if words[i : i + n] == program.split() and words[i + n :]:  # not a bare mention in the prose
                    env = dict(w.split("=", 1) for w in words[:i] if "=" in w)
                    commands.append((env, words[i + n :]))
                    break
    return commands


# Launches of the asynchronous entry point (`-m bandpo_trl.train_async`) have their own parser and batch:
# tests/test_async_recipe.py checks them. A server command written twice in the README is one command.
README_LAUNCHES = [c for c in readme_commands("accelerate launch") if "bandpo_trl.train_async" not in c[1]]
_SERVERS = readme_commands("trl vllm-serve")
README_SERVERS = [command for i, command in enumerate(_SERVERS) if command not in _SERVERS[:i]]


def test_readme_commands_were_found():
    recipes = {args[args.index("--config") + 1] for _, args in README_LAUNCHES if "--config" in args}
    assert len(recipes) >= 4 * 8 + 1  # 8 recipes per paper model, the tiny default
    assert {
        model
        for model in MODELS
        if any(args[args.index("--model") + 1] == MODELS[model][0] for _, args in README_SERVERS)
    } == set(MODELS)


@pytest.mark.parametrize("env, argv", README_LAUNCHES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_readme_launch_command_keeps_the_papers_batch(env, argv):
    launch_args, training_args, model_args = parse_launch(argv)
    recipe = argv[argv.index("--config") + 1]
    assert os.path.exists(os.path.join(ROOT, recipe)), recipe
    if model_folder(recipe) not in MODELS:
        return  # the CPU default and the one-GPU SmolLM2 recipes have their own, small batches (test_recipes.py)
    assert model_args.model_name_or_path == MODELS[model_folder(recipe)][0]
    assert_papers_batch(launch_args, training_args, lora=recipe.endswith("_lora.yaml"))
    if "CUDA_VISIBLE_DEVICES" in env:  # single-node commands that leave GPUs to a vLLM server
        assert len(env["CUDA_VISIBLE_DEVICES"].split(",")) == launch_args.num_processes
    if training_args.vllm_mode == "colocate":
        assert launch_args.num_processes % training_args.vllm_tensor_parallel_size == 0
        assert_valid_tensor_parallel(model_folder(recipe), training_args.vllm_tensor_parallel_size)


def test_every_paper_recipe_has_its_readme_launch_commands():
    launched = set()
    for _, argv in README_LAUNCHES:
        config = os.path.basename(argv[argv.index("--config_file") + 1]).removesuffix(".yaml")
        launched.add((argv[argv.index("--config") + 1], config))
    for model in MODELS:
        for method in COLOCATE_METHODS:
            # The documented default; the other configs it is meant for are covered by the arithmetic tests below.
            default = "zero3" if model in LARGE else "zero2"
            assert (f"recipes/{model}/{method}", default) in launched, (model, method)
        assert (f"recipes/{model}/{LORA}", "single_gpu") in launched
        assert any(recipe == f"recipes/{model}/{SERVER}" for recipe, _ in launched)


@pytest.mark.parametrize("env, argv", README_SERVERS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_readme_vllm_server_command(env, argv):
    server, extra = make_vllm_serve_parser().parse_args_and_config(args=argv, return_remaining_strings=True)
    assert not extra
    model = next(m for m, (hub, _, _) in MODELS.items() if hub == server.model)
    assert server.data_parallel_size == 1  # TRL 1.16's server refuses data parallel > 1 for dense models
    assert server.max_model_len >= 1024 + 4096
    assert_valid_tensor_parallel(model, server.tensor_parallel_size)
    if "CUDA_VISIBLE_DEVICES" in env:
        assert len(env["CUDA_VISIBLE_DEVICES"].split(",")) == server.tensor_parallel_size


def make_vllm_serve_parser():
    from trl.scripts.vllm_serve import make_parser as make_serve_parser

    return make_serve_parser()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_server_mode_pair_splits_one_node(model):
    # The README's two commands for the model's server variant: the server's GPUs and the trainer's are disjoint and
    # together make one 8-GPU node, and the trainer talks to the server's port.
    servers = [
        (env, a)
        for env, a in README_SERVERS
        if a[a.index("--model") + 1] == MODELS[model][0] and "CUDA_VISIBLE_DEVICES" in env
    ]
    trainers = [
        (env, a) for env, a in README_LAUNCHES if f"recipes/{model}/{SERVER}" in a and "CUDA_VISIBLE_DEVICES" in env
    ]
    assert len(servers) == 1 and len(trainers) == 1, model
    (server_env, server_argv), (train_env, train_argv) = servers[0], trainers[0]
    server, _ = make_vllm_serve_parser().parse_args_and_config(args=server_argv, return_remaining_strings=True)
    launch_args, training_args, _ = parse_launch(train_argv)
    server_gpus = set(server_env["CUDA_VISIBLE_DEVICES"].split(","))
    train_gpus = set(train_env["CUDA_VISIBLE_DEVICES"].split(","))
    assert not server_gpus & train_gpus and len(server_gpus | train_gpus) == 8
    assert (training_args.use_vllm, training_args.vllm_mode) == (True, "server")
    assert training_args.vllm_server_port == server.port
    assert training_args.vllm_server_host in ("127.0.0.1", "localhost", "0.0.0.0")
    assert training_args.vllm_server_timeout >= 600  # loading a 7-8B model with CUDA graphs takes minutes
    assert_papers_batch(launch_args, training_args)


# ---------------------------------------------------------------------------------------------------------------------
# slurm/train.slurm


def slurm_dry_run(tmp_path, nodes: int, *options: str) -> tuple[list[list[str]], subprocess.CompletedProcess]:
    """Run train.slurm with BANDPO_SLURM_DRY_RUN=1 on a made-up allocation of `nodes` nodes; the srun commands."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    scontrol = fake / "scontrol"  # SLURM's node-list expansion, for the list given below
    scontrol.write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && tr , "\\n" <<<"$3"\n')
    scontrol.chmod(0o755)
    env = dict(
        os.environ,
        # The script reads the recipe with `python` (PyYAML): this interpreter's, e.g. .venv/bin/python.
        PATH=os.pathsep.join([str(fake), os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        BANDPO_SLURM_DRY_RUN="1",
        SLURM_JOB_NODELIST=",".join(f"node{i}" for i in range(nodes)),
        SLURM_SUBMIT_DIR=ROOT,
    )
    proc = subprocess.run(["bash", SLURM, *options], env=env, capture_output=True, text=True, timeout=60)
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("srun")], proc


def slurm_launch(srun: list[str], machine_rank: int) -> list[str]:
    """The `accelerate launch` arguments one training node's task runs (its SLURM_PROCID = machine_rank)."""
    i = srun.index("bash")
    script, argv = srun[i + 2], srun[i + 4 :]
    assert srun[i + 1] == "-c" and script == 'exec accelerate launch --machine_rank "$SLURM_PROCID" "$@"'
    return ["--machine_rank", str(machine_rank), *argv]


def slurm_cases():
    """(recipe, accelerate config, nodes, server node?): every recipe on every config it is meant for, on 1 and 2
    nodes (2 and 3 with the vLLM node); and one recipe per micro-batch size on 4 to 32 nodes."""
    for model in MODELS:
        for method in COLOCATE_METHODS:
            for config in meant_for(model):
                for nodes in (1, 2):
                    yield f"recipes/{model}/{method}", config, nodes, False
        for config in ["zero3", "fsdp2"] if model in LARGE else ["zero2", "zero3", "fsdp2"]:
            for nodes in (2, 3):  # 1 or 2 training nodes and a vLLM node
                yield f"recipes/{model}/{SERVER}", config, nodes, True
        yield f"recipes/{model}/bandpo/config_kl.yaml", meant_for(model)[0], 3, True  # a colocate recipe, switched
    for model in ("DeepSeek-R1-Distill-Qwen-7B", "DeepSeek-R1-Distill-Qwen-1.5B"):
        # Micro-batch 2 (4) allows up to 1024 / (2 x 8) = 64 (32) nodes; 64 cannot be parsed in one process, whose
        # TRL config then sees a generation batch of 2 x 1 x 4 = 8 < num_generations.
        for nodes in (4, 8, 16, 32):
            yield f"recipes/{model}/bandpo/config_kl.yaml", meant_for(model)[0], nodes, False
        yield f"recipes/{model}/{SERVER}", meant_for(model)[0], 5, True


@pytest.mark.parametrize("recipe, config, nodes, server", list(slurm_cases()), ids=str)
def test_slurm_keeps_the_papers_batch_on_n_nodes(tmp_path, recipe, config, nodes, server):
    model = model_folder(recipe)
    tp = "8" if MODELS[model][1] % 8 == 0 else "4"
    options = ["--recipe", recipe, "--accelerate", config] + (
        ["--vllm_server_node", "--vllm_tp", tp] if server else []
    )
    sruns, proc = slurm_dry_run(tmp_path, nodes, *options)
    assert proc.returncode == 0, proc.stderr
    train_nodes = nodes - 1 if server else nodes
    assert len(sruns) == (2 if server else 1)
    train = sruns[-1]
    assert f"--nodes={train_nodes}" in train and f"--ntasks={train_nodes}" in train
    for rank in sorted({0, train_nodes - 1}):
        launch_args, training_args, model_args = parse_launch(slurm_launch(train, rank))
        assert (launch_args.num_machines, launch_args.num_processes) == (train_nodes, 8 * train_nodes)
        assert launch_args.machine_rank == rank and launch_args.main_process_ip == "node0"
        assert os.path.basename(launch_args.config_file) == f"{config}.yaml"
        assert model_args.model_name_or_path == MODELS[model][0]
        assert_papers_batch(launch_args, training_args)
        env, torchrun = torchrun_view(launch_args)
        if train_nodes > 1:  # every node meets at the first one's address, with its own rank
            assert get_rdzv_endpoint(torchrun) == "node0:29500"
            assert (int(torchrun.nnodes), int(torchrun.nproc_per_node), int(torchrun.node_rank)) == (
                train_nodes,
                8,
                rank,
            )
        if config == "fsdp2":
            assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        elif config.startswith("zero"):
            assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == config[-1]
    if server:
        serve = sruns[0]
        assert f"--nodelist=node{nodes - 1}" in serve
        argv = serve[serve.index("vllm-serve") + 1 :]
        server_args, _ = make_vllm_serve_parser().parse_args_and_config(args=argv, return_remaining_strings=True)
        assert server_args.model == MODELS[model][0] and server_args.max_model_len >= 5120
        assert_valid_tensor_parallel(model, server_args.tensor_parallel_size)
        assert training_args.vllm_mode == "server" and training_args.vllm_server_host == f"node{nodes - 1}"
        assert training_args.vllm_server_port == server_args.port


def test_slurm_refuses_a_node_count_that_cannot_hold_the_batch(tmp_path):
    sruns, proc = slurm_dry_run(tmp_path, 3, "--recipe", f"recipes/DeepSeek-R1-Distill-Qwen-7B/{COLOCATE_METHODS[0]}")
    assert proc.returncode == 2 and not sruns
    assert "does not divide 1024" in proc.stderr


def test_slurm_passes_trainer_overrides_through(tmp_path):
    sruns, proc = slurm_dry_run(
        tmp_path,
        2,
        "--recipe",
        "recipes/DeepSeek-R1-Distill-Llama-8B/bandpo/config_kl.yaml",
        "--",
        "--band_delta",
        "0.1",
        "--max_steps",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    _, training_args, _ = parse_launch(slurm_launch(sruns[0], 1))
    assert (training_args.band_delta, training_args.max_steps) == (0.1, 5)
    assert os.path.basename(parse_launch(slurm_launch(sruns[0], 1))[0].config_file) == "zero3.yaml"  # the default


def test_slurm_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, "--severity=style", SLURM], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# The README's table of batch arithmetic


def readme_batch_table() -> list[dict]:
    text = readme_text()
    section = text[text.index("### Batch arithmetic for any number of nodes") :]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0][0].isdigit():
            keys = ["per_device", "nodes", "processes", "ga", "spg", "step", "generation", "launch"]
            rows.append(dict(zip(keys, cells)))
    return rows


def test_readme_batch_table_is_right_and_is_what_slurm_computes(tmp_path):
    rows = readme_batch_table()
    assert len(rows) >= 8
    documented = {(int(r["per_device"].split()[0]), int(r["nodes"].split()[0]), "vLLM" in r["nodes"]) for r in rows}
    for model in MODELS:  # the table's micro-batch sizes are the recipes'
        _, args, _ = parse_training(["--config", os.path.join(RECIPES, model, COLOCATE_METHODS[0])])
        assert (args.per_device_train_batch_size, 1, False) in documented, model
    recipe_for = {
        "2": "recipes/DeepSeek-R1-Distill-Qwen-7B/bandpo/config_kl.yaml",
        "4": "recipes/DeepSeek-R1-Distill-Qwen-1.5B/bandpo/config_kl.yaml",
    }
    for row in rows:
        per_device, processes, ga, spg = (int(row[k].split()[0]) for k in ("per_device", "processes", "ga", "spg"))
        assert per_device * processes * ga == int(row["step"]) == PAPER_STEP, row
        assert per_device * processes * spg == int(row["generation"]) == PAPER_GENERATION, row
        assert spg == 4 * ga, row
        nodes = int(row["nodes"].split()[0])
        server = "vLLM" in row["nodes"]
        if row["launch"] == "slurm":
            assert processes == 8 * (nodes - 1 if server else nodes), row
            options = ["--recipe", recipe_for[str(per_device)]] + (["--vllm_server_node"] if server else [])
            sruns, proc = slurm_dry_run(tmp_path, nodes, *options)
            assert proc.returncode == 0, proc.stderr
            launch_args, training_args, _ = parse_launch(slurm_launch(sruns[-1], 0))
            assert (
                launch_args.num_processes,
                training_args.gradient_accumulation_steps,
                training_args.steps_per_generation,
            ) == (processes, ga, spg), row


# ---------------------------------------------------------------------------------------------------------------------
# Accelerate configs for N nodes


@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3", "fsdp2"])
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_accelerate_config_with_multinode_overrides(config, nodes):
    # The documented overrides turn any 8-GPU config into an N-node one; accelerate validates them and gives torchrun
    # N nodes of 8 processes with this node's rank.
    argv = [
        "--config_file",
        os.path.join(CONFIGS, f"{config}.yaml"),
        "--num_machines",
        str(nodes),
        "--num_processes",
        str(8 * nodes),
        "--machine_rank",
        str(nodes - 1),
        "--main_process_ip",
        "10.0.0.1",
        "--main_process_port",
        "29500",
        "--rdzv_backend",
        "c10d",
        "-m",
        "bandpo_trl.train",
    ]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert (args.num_machines, args.num_processes, args.machine_rank) == (nodes, 8 * nodes, nodes - 1)
    env, torchrun = torchrun_view(args)
    assert (int(torchrun.nproc_per_node), env["ACCELERATE_MIXED_PRECISION"]) == (8, "bf16")
    if nodes > 1:
        assert (int(torchrun.nnodes), int(torchrun.node_rank)) == (nodes, nodes - 1)
        assert get_rdzv_endpoint(torchrun) == "10.0.0.1:29500"
    if config.startswith("zero"):
        assert args.use_deepspeed and args.zero_stage == int(config[-1])
        assert args.deepspeed_multinode_launcher == "standard"  # torchrun on every node, as srun starts it
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == config[-1]
    else:
        assert env.get("ACCELERATE_USE_FSDP") == ("true" if config == "fsdp2" else None)
        if config == "fsdp2":
            assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
            assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
            assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
            assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"  # see fsdp2.yaml: TRL's reference model
            # The recipes' gradient_checkpointing does the recomputation; transformers refuses both at once.
            assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"


@pytest.mark.parametrize("model", sorted(LARGE))
def test_large_model_recipes_fit_the_sharded_set_up(model):
    for method in [*COLOCATE_METHODS, SERVER, LORA]:
        _, args, _ = parse_training(["--config", os.path.join(RECIPES, model, method)])
        assert args.gradient_checkpointing, method
        assert args.per_device_train_batch_size <= 2, method  # the logits of 5120-token sequences
        if args.vllm_mode == "colocate":
            assert args.vllm_enable_sleep_mode  # vLLM releases its memory while the model trains
            assert args.vllm_gpu_memory_utilization <= 0.5
    for path in glob.glob(os.path.join(RECIPES, model, "**", "*.yaml"), recursive=True):
        with open(path) as f:
            header = f.read().split("\n\n")[0]
        if "lora" not in path:
            assert "zero3.yaml" in header, path  # each file names its launch
