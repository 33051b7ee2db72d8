"""Helpers shared by the evaluation tests: a scripted generator, a stand-in vLLM, a thinking chat template, and the
toy problems of the end-to-end runs with the `bandpo-eval` arguments that evaluate them. The tiny models of those
runs are fixtures in `conftest.py` (`oracle_model_dir`, `base_and_adapter_dirs`)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import torch

from bandpo_trl.evaluation import Completion, generation

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_TOY = 2  # toy problems of the end-to-end runs


class ScriptedGenerator:
    """Returns pre-written completions per prompt (keyed by the prompt's token ids)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, n, desc=None):
        self.calls.append((len(prompts), n))
        out = []
        for ids in prompts:
            texts = self.script[self.tokenizer.decode(ids)]
            assert len(texts) == n
            out.append([Completion(text=t, num_tokens=len(t) + 1, finished=t != "") for t in texts])
        return out


# A Qwen3-style template: `enable_thinking=False` (a chat_template_kwargs entry) pre-fills an empty thinking block.
THINKING_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: "
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
NO_THINKING = {"enable_thinking": False}


def thinking_tokenizer():
    from bandpo_trl.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


def toy_problems():
    from bandpo_trl.data import load_named_dataset

    # What `bandpo-eval --benchmarks toy_arithmetic --num_problems 2 --seed 0` evaluates.
    return load_named_dataset("toy_arithmetic", split="test", num_samples=NUM_TOY, seed=0)


def memorize(model, tokenizer, pairs, steps, lr):
    """Plain-torch supervised training of `prompt -> answer<eos>` pairs (completion-only loss)."""
    sequences = [(tokenizer(p)["input_ids"], tokenizer(a)["input_ids"] + [tokenizer.eos_token_id]) for p, a in pairs]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(steps):
            loss = sum(
                model(input_ids=torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c])).loss
                for p, c in sequences
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return loss.item()


def read_results(output_dir, benchmark="toy_arithmetic"):
    with open(os.path.join(output_dir, f"{benchmark}.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    with open(os.path.join(output_dir, "summary.json")) as handle:
        summary = json.load(handle)
    return records, summary


def toy_cli_args(model, output_dir, *extra):
    return [
        "--model", str(model), "--benchmarks", "toy_arithmetic", "--k", "4", "--pass_k", "1", "4",
        "--num_problems", str(NUM_TOY), "--max_new_tokens", "5", "--batch_size", "8", "--seed", "0",
        "--output_dir", str(output_dir), "--show_progress", "false", *extra,
    ]  # fmt: skip


def install_stand_in_vllm(monkeypatch, answers, adapter_answers=None, seen=None):
    """A stand-in `vllm` package (vLLM is not installed here) that records what it is handed and answers each prompt
    from `answers` (prompt text -> completion), or from `adapter_answers` when a LoRARequest comes with the call."""
    from transformers import AutoTokenizer

    seen = {} if seen is None else seen

    class LLM:
        def __init__(self, model, tokenizer, **kwargs):
            assert os.path.isfile(os.path.join(model, "config.json"))  # a full checkpoint: the base model
            seen["llm"] = dict(model=model, tokenizer=tokenizer, **kwargs)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            seen.setdefault("prompts", []).extend(p["prompt_token_ids"] for p in prompts)
            seen["params"] = params.kwargs
            seen.setdefault("lora_requests", []).append(lora_request)
            if lora_request is not None:  # vLLM refuses a LoRARequest unless LoRA was enabled
                assert seen["llm"].get("enable_lora") is True and seen["llm"].get("max_lora_rank", 0) >= 1
            table = adapter_answers if lora_request is not None else answers
            out = []
            for p in prompts:
                gold = table[self.tokenizer.decode(p["prompt_token_ids"])]
                sample = types.SimpleNamespace(text=gold, token_ids=[0] * (len(gold) + 1), finish_reason="stop")
                out.append(types.SimpleNamespace(outputs=[sample] * params.kwargs["n"]))
            return out

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LoRARequest:  # vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    modules = {name: types.ModuleType(name) for name in ("vllm", "vllm.lora", "vllm.lora.request")}
    modules["vllm"].LLM, modules["vllm"].SamplingParams = LLM, SamplingParams
    modules["vllm.lora.request"].LoRARequest = LoRARequest
    modules["vllm"].lora, modules["vllm.lora"].request = modules["vllm.lora"], modules["vllm.lora.request"]
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name != "vllm.lora.request")
        if name != "vllm.lora.request":
            module.__path__ = []
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(generation, "_cuda_available", lambda: True)  # what a GPU machine with vLLM looks like
    return seen
