"""The arguments of `bandpo-eval` (`bandpo_trl.evaluation.arguments.EvalArguments`): defaults, parsing and refusals."""

from __future__ import annotations

import pytest

from bandpo_trl.evaluation import EvalArguments

NO_THINKING = {"enable_thinking": False}


def test_eval_arguments():
    args = EvalArguments(model="m")
    assert (args.benchmarks, args.k, args.pass_k, args.temperature, args.top_p) == (
        ["aime24", "aime25", "amc23"],
        32,
        [32],
        1.0,
        1.0,
    )
    assert EvalArguments(model="m", benchmarks=["aime24,amc23", "math500"], k=8, pass_k=[8, 1]).benchmarks == [
        "aime24",
        "amc23",
        "math500",
    ]
    with pytest.raises(ValueError, match="pass_k"):
        EvalArguments(model="m", k=4, pass_k=[8])
    with pytest.raises(ValueError, match="backend"):
        EvalArguments(model="m", backend="tgi")


def test_chat_template_kwargs_argument_from_the_cli_and_yaml(tmp_path):
    from trl import TrlParser

    assert EvalArguments(model="m").chat_template_kwargs == {}
    assert EvalArguments(model="m", chat_template_kwargs='{"enable_thinking": false}').chat_template_kwargs == (
        NO_THINKING
    )
    for bad in ["enable_thinking=False", "[1, 2]"]:
        with pytest.raises(ValueError, match="chat_template_kwargs"):
            EvalArguments(model="m", chat_template_kwargs=bad)
    parser = TrlParser(dataclass_types=[EvalArguments])
    (args,) = parser.parse_args_and_config(
        args=["--model", "m", "--chat_template_kwargs", '{"enable_thinking": false}']
    )
    assert args.chat_template_kwargs == NO_THINKING
    config = tmp_path / "eval.yaml"
    config.write_text("model: m\nchat_template_kwargs:\n  enable_thinking: false\n")
    (args,) = parser.parse_args_and_config(args=["--config", str(config)])
    assert args.chat_template_kwargs == NO_THINKING
