"""`BenchmarkEvalCallback` (`bandpo_trl.evaluation.callback`): the benchmark evaluation during training, logged with
the trainer's metrics, on TRL's utilities (split / gather, unwrap_model_for_generation, the trainer's vLLM engine)."""

from __future__ import annotations

import functools
import importlib.machinery
import json
import sys
import types

import pytest
import torch
from eval_helpers import NUM_TOY, thinking_tokenizer

from bandpo_trl.evaluation import (
    BenchmarkEvalCallback,
    SamplingSettings,
    TransformersGenerator,
    encode_prompt,
    evaluate_benchmark,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


@pytest.mark.parametrize("attached", [False, True], ids=["callbacks=", "attach"])
def test_callback_logs_benchmark_metrics_during_training(oracle_model_dir, tmp_path, attached):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bandpo_trl.rewards import toy_accuracy_reward

    callback = BenchmarkEvalCallback(
        benchmarks=["toy_arithmetic"],
        every_n_steps=2,
        k=2,
        num_problems=NUM_TOY,
        sampling=SamplingSettings(max_new_tokens=5),
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        learning_rate=0.0,  # the policy stays the oracle: the logged accuracy must be 1
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        max_steps=4,
        logging_steps=3,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(oracle_model_dir),
        reward_funcs=toy_accuracy_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2="] * 4, "answer": ["2", "4"] * 4}),
        callbacks=[callback],
    )
    if attached:  # first in line, and generation through the trainer (unwrap_model_for_generation)
        callback.attach(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval/toy_arithmetic/mean@2" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]  # every 2 steps, besides the regular logs at step 3
    for entry in logged:
        assert entry["eval/toy_arithmetic/mean@2"] == entry["eval/toy_arithmetic/pass@2"] == 1.0
    assert any("loss" in entry for entry in logged)  # they join the trainer's own log entry of that step
    records = [
        json.loads(line) for line in open(tmp_path / "run" / "benchmark_eval" / "step-2" / "toy_arithmetic.jsonl")
    ]
    assert len(records) == NUM_TOY and all(r["correct"] == [True, True] for r in records)
    assert [h["step"] for h in callback.history] == [2, 4]


def test_callback_progress_bar_follows_disable_tqdm(tiny_model_dir, capfd):
    """The sampling bar shows unless the trainer's `disable_tqdm` (or the callback's own `show_progress`) hides it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    state = TrainerState()
    state.global_step = 1

    def bar_shown(callback, disable_tqdm):
        args = TrainingArguments(output_dir=str(tiny_model_dir), disable_tqdm=disable_tqdm, report_to="none")
        capfd.readouterr()
        callback._last_step = -1
        callback.on_step_end(args, state, TrainerControl(), model=model, processing_class=tokenizer)
        return "sample" in capfd.readouterr().err

    def make(**kwargs):
        return BenchmarkEvalCallback(
            ["toy_arithmetic"],
            1,
            k=1,
            num_problems=1,
            sampling=SamplingSettings(max_new_tokens=2),
            save_results=False,
            **kwargs,
        )

    assert bar_shown(make(), disable_tqdm=False)
    assert not bar_shown(make(), disable_tqdm=True)
    assert not bar_shown(make(show_progress=False), disable_tqdm=False)
    assert bar_shown(make(show_progress=True), disable_tqdm=True)


def test_callback_leaves_the_training_rng_alone_and_can_be_disabled(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    callback = BenchmarkEvalCallback(
        ["toy_arithmetic"], every_n_steps=1, k=2, num_problems=1, sampling=SamplingSettings(max_new_tokens=2)
    )
    model.train()
    state = torch.get_rng_state()
    metrics = callback.evaluate(model, tokenizer)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training  # restored after generation
    assert set(metrics) == {"eval/toy_arithmetic/mean@2", "eval/toy_arithmetic/pass@2"}

    disabled = BenchmarkEvalCallback(["toy_arithmetic"], every_n_steps=0)
    control = TrainerControl()
    train_state = TrainerState()
    train_state.global_step = 5
    disabled.on_step_end(None, train_state, control, model=model, processing_class=tokenizer)
    assert not control.should_log and disabled.history == []


def test_callback_encodes_prompts_with_the_trainer_chat_template_kwargs(tiny_model_dir):
    """`on_step_end` takes the trainer's `args.chat_template_kwargs` (GRPOConfig), as GRPOTrainer encodes prompts."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState
    from trl import GRPOConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = thinking_tokenizer()
    seen = []
    original = model.generate

    def recording_generate(*args, **kwargs):
        seen.extend(
            tokenizer.decode(row[mask.bool()]) for row, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])
        )
        return original(*args, **kwargs)

    model.generate = recording_generate
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1="}]], "answer": ["2"]})
    state = TrainerState()
    state.global_step = 1
    for config_kwargs, own, expected in [
        ('{"enable_thinking": false}', None, "<think>\n\n</think>\n\n"),  # GRPOConfig parses the JSON string
        (None, None, ""),
        ('{"enable_thinking": false}', {"enable_thinking": True}, ""),  # the callback's own value wins
    ]:
        args = GRPOConfig(
            output_dir=str(tiny_model_dir), chat_template_kwargs=config_kwargs, report_to="none", use_cpu=True
        )
        callback = BenchmarkEvalCallback(
            ["chat"], 1, k=1, sampling=SamplingSettings(max_new_tokens=1), datasets={"chat": chat}, save_results=False,
            show_progress=False,
            chat_template_kwargs=own,
        )  # fmt: skip
        seen.clear()
        callback.on_step_end(args, state, TrainerControl(), model=model, processing_class=tokenizer)
        assert seen == ["user: 1+1=\nassistant: " + expected]


# --------------------------------------------------------------------------------------------------------------------
# The callback on TRL's utilities: split / gather, unwrap_model_for_generation, the trainer's vLLM engine
# --------------------------------------------------------------------------------------------------------------------


def _unsplit_records(callback, model, tokenizer):
    """The callback's evaluation done plainly on one process: each benchmark sampled whole, in turn, under one
    `torch.manual_seed(seed + rank)` in a forked RNG state."""
    from bandpo_trl.evaluation.scoring import summarize_benchmark

    expected = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(callback.sampling.seed)
        generator = TransformersGenerator(
            model, tokenizer, callback.sampling, batch_size=callback.batch_size, show_progress=False
        )
        for name in callback.benchmarks:
            dataset = callback._dataset(name)
            result = evaluate_benchmark(name, dataset, generator, tokenizer, k=callback.k, show_progress=False)
            records = json.loads(json.dumps(result.records))  # as written to the .jsonl file
            expected[name] = records, summarize_benchmark(records, callback.k, callback.pass_k)
    return expected


def _grpo_trainer(model_dir, tmp_path, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bandpo_trl.rewards import toy_accuracy_reward

    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=2,
        num_generations=2, max_completion_length=4, max_steps=1, save_strategy="no", disable_tqdm=True, **config,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]})
    return GRPOTrainer(model=str(model_dir), reward_funcs=toy_accuracy_reward, args=args, train_dataset=dataset)


def test_callback_split_and_gather_on_one_process_gives_the_unsplit_records(tiny_model_dir, tmp_path, monkeypatch):
    """On one process, split_between_processes hands over every problem and gather_object gives them back: the same
    samples, records and metrics as sampling each benchmark whole, with or without the trainer
    (unwrap_model_for_generation, once)."""
    from bandpo_trl.evaluation import callback as callback_module

    trainer = _grpo_trainer(tiny_model_dir, tmp_path)
    tokenizer = trainer.processing_class
    unwraps = []
    original = callback_module.unwrap_model_for_generation

    def spy(model, accelerator, **kwargs):
        unwraps.append((model, kwargs["gather_deepspeed3_params"]))
        return original(model, accelerator, **kwargs)

    monkeypatch.setattr(callback_module, "unwrap_model_for_generation", spy)
    from datasets import Dataset

    chat = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"{i}+{i}="}] for i in range(4)], "answer": ["0", "2", "4", "6"]}
    )
    kwargs = dict(
        k=3, num_problems=3, sampling=SamplingSettings(max_new_tokens=4, temperature=1.0, seed=7), pass_k=[1, 3]
    )
    kwargs["datasets"] = {"chat": chat}
    expected = _unsplit_records(
        BenchmarkEvalCallback(["toy_arithmetic", "chat"], 1, **kwargs), trainer.model, tokenizer
    )
    for attached in (False, True):
        callback = BenchmarkEvalCallback(["toy_arithmetic", "chat"], 1, **kwargs)
        if attached:
            callback.attach(trainer)
            assert trainer.callback_handler.callbacks[0] is callback
        out = tmp_path / f"attached-{attached}"
        metrics = callback.evaluate(trainer.model, tokenizer, step=1, output_dir=str(out), show_progress=False)
        for name, (records, summary) in expected.items():
            assert [json.loads(line) for line in open(out / f"{name}.jsonl")] == records
            assert metrics[f"eval/{name}/mean@3"] == summary["mean@3"]
            assert metrics[f"eval/{name}/pass@1"] == summary["pass@1"]
            assert metrics[f"eval/{name}/pass@3"] == summary["pass@3"]
        # TRL's unwrap, once for the whole evaluation (ZeRO-3: one parameter gathering), with the trainer only.
        assert unwraps == ([(trainer.model_wrapped, True)] if attached else [])
    # Another model than the trainer's (e.g. a reloaded checkpoint) generates itself.
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    callback.evaluate(other, tokenizer, show_progress=False)
    assert len(unwraps) == 1


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_callback_shards_cover_every_problem_once(world, n):
    """The sharding of several processes, simulated with accelerate's own split: equal shares (lockstep), and the
    gathered records merge back to every problem once, in order."""
    from accelerate import PartialState

    from bandpo_trl.evaluation.callback import merge_shards

    shares = []
    for rank in range(world):
        fake_state = types.SimpleNamespace(num_processes=world, process_index=rank)
        with PartialState.split_between_processes(fake_state, list(range(n)), apply_padding=True) as share:
            shares.append(list(share))
    assert len({len(share) for share in shares}) == 1  # the same number of generate calls on every process
    gathered = [(i, f"record of {i} on rank {rank}") for rank, share in enumerate(shares) for i in share]
    merged = merge_shards(gathered)
    assert [record.split()[2] for record in merged] == [str(i) for i in range(n)]


def _stand_in_sampling_params(monkeypatch):
    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = SamplingParams
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", vllm)


class FakeColocatedLLM:
    """The trainer's colocated `vllm.LLM`, standing in: answers every toy prompt right, records the calls."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.calls, self.events = tokenizer, answers, [], []

    def generate(self, prompts, sampling_params, use_tqdm=True, **kwargs):
        self.calls.append(([p["prompt_token_ids"] for p in prompts], sampling_params.kwargs, kwargs))
        out = []
        for p in prompts:
            gold = self.answers[self.tokenizer.decode(p["prompt_token_ids"])]
            sample = types.SimpleNamespace(text=gold, token_ids=[0] * (len(gold) + 1), finish_reason="stop")
            out.append(types.SimpleNamespace(outputs=[sample] * sampling_params.kwargs["n"]))
        return out

    def wake_up(self, tags):
        self.events.append(("wake_up", tuple(tags)))

    def sleep(self, level):
        self.events.append(("sleep", level))


def test_callback_generates_with_the_trainer_vllm_engine(tiny_model_dir, monkeypatch):
    """`args.use_vllm`: the trainer's engine samples (not the model), with the current weights pushed first, as
    GRPOTrainer 1.16 holds it (`trainer.vllm_generation.llm`) or as a trainer exposing `.llm` itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState

    _stand_in_sampling_params(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def no_transformers_generation(*args, **kwargs):
        raise AssertionError("with use_vllm, the trainer's vLLM engine generates")

    model.generate = no_transformers_generation
    from bandpo_trl.data import load_named_dataset

    problems = load_named_dataset("toy_arithmetic", split="test", num_samples=NUM_TOY, seed=11)  # the callback's
    answers = dict(zip(problems["prompt"], problems["answer"]))
    state = TrainerState()
    state.global_step = 4
    args = types.SimpleNamespace(use_vllm=True, vllm_mode="colocate", output_dir="unused", disable_tqdm=True)

    for layout in ("vllm_generation", "trainer.llm", "sleep mode"):
        llm = FakeColocatedLLM(tokenizer, answers)
        syncs = []
        engine = types.SimpleNamespace(
            mode="colocate", llm=llm, tensor_parallel_size=1, enable_sleep_mode=layout == "sleep mode",
            sync_weights=functools.partial(syncs.append, "sync"),
        )  # fmt: skip
        trainer = types.SimpleNamespace(model=model, args=args, _last_loaded_step=3)
        if layout == "trainer.llm":
            trainer.llm, trainer.vllm_mode, trainer._move_model_to_vllm = llm, "colocate", engine.sync_weights
        else:
            trainer.vllm_generation = engine
        callback = BenchmarkEvalCallback(
            ["toy_arithmetic"], 2, k=3, num_problems=NUM_TOY, sampling=SamplingSettings(max_new_tokens=5, seed=11),
            save_results=False, trainer=trainer,
        )  # fmt: skip
        control = callback.on_step_end(args, state, TrainerControl(), model=model, processing_class=tokenizer)
        assert control.should_log and callback._pending["eval/toy_arithmetic/mean@3"] == 1.0
        (prompts, params, extra), = llm.calls  # fmt: skip
        assert prompts == [encode_prompt(tokenizer, p) for p in problems["prompt"]]
        assert params == {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 5, "seed": 11} and extra == {}
        assert syncs == ["sync"] and trainer._last_loaded_step == 4  # pushed once; the trainer need not push again
        if layout == "sleep mode":
            assert llm.events == [("wake_up", ("kv_cache",)), ("sleep", 2)] and engine._llm_weights_sleeping
        callback.evaluate(model, tokenizer, step=4, show_progress=False)
        assert syncs == ["sync"]  # already current at this step


def test_callback_generates_through_the_trainer_vllm_server(tiny_model_dir, monkeypatch):
    """Server mode: the main process sends the prompts (token ids) to the trainer's vLLM client and decodes the
    returned token ids; a completion is finished when it ends with EOS, as TRL counts truncation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    from bandpo_trl.data import load_named_dataset

    problems = load_named_dataset("toy_arithmetic", split="test", num_samples=NUM_TOY, seed=3)  # the callback's
    answers = dict(zip(problems["prompt"], problems["answer"]))
    calls = []

    class FakeClient:
        def generate(self, prompts, n, **kwargs):
            calls.append((prompts, n, kwargs))
            rows = []
            for ids in prompts:
                gold = tokenizer(answers[tokenizer.decode(ids)])["input_ids"]
                rows += [gold + [tokenizer.eos_token_id]] * (n - 1) + [gold + gold]  # the last one cut at max_tokens
            return {"prompt_ids": prompts, "completion_ids": rows, "logprobs": None}

    engine = types.SimpleNamespace(mode="server", vllm_client=FakeClient(), sync_weights=lambda: None)
    trainer = types.SimpleNamespace(
        model=model, vllm_generation=engine, args=types.SimpleNamespace(use_vllm=True, vllm_mode="server")
    )
    callback = BenchmarkEvalCallback(
        ["toy_arithmetic"], 1, k=2, num_problems=NUM_TOY, sampling=SamplingSettings(max_new_tokens=5, seed=3),
        trainer=trainer,
    )  # fmt: skip
    metrics = callback.evaluate(model, tokenizer, step=1, show_progress=False)
    (prompts, n, kwargs), = calls  # fmt: skip
    assert prompts == [encode_prompt(tokenizer, p) for p in problems["prompt"]] and n == 2
    assert kwargs["max_tokens"] == 5 and kwargs["generation_kwargs"] == {"seed": 3} and kwargs["logprobs"] is None
    assert metrics["eval/toy_arithmetic/pass@2"] == 1.0 and metrics["eval/toy_arithmetic/mean@2"] == 0.5
