"""Loading for evaluation (`bandpo_trl.evaluation.loading`): a LoRA adapter on its base model, given as `--adapter`
or as the `--model` directory; merged in memory for transformers, served natively by vLLM (through a stand-in).

The base model gives each toy problem the other one's answer (mean@k = 0); its LoRA adapter gives the right ones.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
from eval_helpers import install_stand_in_vllm, read_results, toy_cli_args, toy_problems

from bandpo_trl.evaluation import generation, main, resolve_model_and_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def test_lora_adapter_through_the_cli(base_and_adapter_dirs, tmp_path, monkeypatch):
    import peft

    base, adapter = base_and_adapter_dirs
    loaded_with_auto_peft = []
    original = peft.AutoPeftModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        loaded_with_auto_peft.append(str(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(peft.AutoPeftModelForCausalLM, "from_pretrained", classmethod(spy))
    main(toy_cli_args(base, tmp_path / "base"))
    assert read_results(tmp_path / "base")[1]["results"]["toy_arithmetic"]["mean@4"] == 0.0
    # --adapter, and the default output directory <adapter>/eval
    args = toy_cli_args(base, "unused", "--adapter", str(adapter))
    del args[args.index("--output_dir") : args.index("--output_dir") + 2]
    main(args)
    records, summary = read_results(adapter / "eval")
    results = summary["results"]["toy_arithmetic"]
    assert results["pass@4"] == 1.0 and results["mean@4"] >= 0.9
    assert summary["config"]["adapter"] == str(adapter)
    # An adapter directory given as --model stands for base + adapter.
    assert resolve_model_and_adapter(str(adapter)) == (str(base), str(adapter))
    main(toy_cli_args(adapter, tmp_path / "as-model"))
    assert read_results(tmp_path / "as-model")[0] == records
    # The transformers backend merges in memory: peft's AutoPeftModelForCausalLM (base recorded in the adapter).
    assert loaded_with_auto_peft == [str(adapter), str(adapter)]


def test_vllm_backend_serves_a_lora_adapter_natively(base_and_adapter_dirs, tmp_path, monkeypatch):
    """With an adapter, vLLM loads the base model with LoRA enabled and gets the adapter as a LoRARequest with every
    generate call: no merged checkpoint is written, to a temporary directory or anywhere."""
    from transformers import PreTrainedModel

    base, adapter = base_and_adapter_dirs
    pairs = list(zip(toy_problems()["prompt"], toy_problems()["answer"]))
    swapped = dict(zip([p for p, _ in pairs], [a for _, a in pairs][::-1]))
    # Without the adapter the stand-in answers as the base model does (the swapped answers), with it as the adapter.
    seen = install_stand_in_vllm(monkeypatch, answers=swapped, adapter_answers=dict(pairs))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def no_saving(*args, **kwargs):
        raise AssertionError("the vLLM backend must not write a merged checkpoint")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_saving)
    runs = {
        "va": toy_cli_args(base, tmp_path / "va", "--adapter", str(adapter)),
        "vm": toy_cli_args(adapter, tmp_path / "vm"),
    }
    for out, cli in runs.items():  # --model BASE --adapter ADAPTER, and the adapter directory as --model
        seen.clear()
        main([*cli, "--backend", "vllm"])
        _, summary = read_results(tmp_path / out)
        assert summary["results"]["toy_arithmetic"]["mean@4"] == 1.0  # the adapter's answers: the LoRARequest arrived
        assert seen["llm"]["model"] == str(base) and seen["llm"]["tokenizer"] == str(base)  # no tokenizer in adapter/
        assert seen["llm"]["enable_lora"] is True and seen["llm"]["max_lora_rank"] == 8  # the adapter's r=8
        (request,) = seen["lora_requests"]
        assert (request.lora_path, request.lora_int_id) == (str(adapter), 1)
    assert os.listdir(scratch) == []  # no temporary directory either

    # max_lora_rank: the adapter's largest rank rounded up to a value vLLM accepts, or the flag.
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for r, rank_pattern, expected in [(8, {}, 8), (12, {}, 16), (8, {"q_proj": 40}, 64), (1, {}, 1)]:
        config_path.write_text(json.dumps({**config, "r": r, "rank_pattern": rank_pattern}))
        assert generation.vllm_max_lora_rank(str(adapter)) == expected
    config_path.write_text(json.dumps({**config, "r": 600}))
    with pytest.raises(ValueError, match="600"):
        generation.vllm_max_lora_rank(str(adapter))
    config_path.write_text(json.dumps(config))
    main([*runs["va"], "--backend", "vllm", "--vllm_max_lora_rank", "32"])
    assert seen["llm"]["max_lora_rank"] == 32
