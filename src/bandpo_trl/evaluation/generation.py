"""Generation: prompt encoding as TRL does it, the transformers and vLLM samplers, and the choice of backend."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .sampling import SamplingSettings

logger = logging.getLogger(__name__)

# The generation backends `resolve_backend` accepts: "auto" picks one of the other two.
BACKENDS = ("auto", "vllm", "transformers")


@dataclass
class Completion:
    """One sampled completion: its text (special tokens removed), its length in tokens, and whether it ended on its
    own (an end-of-sequence token) rather than at `max_new_tokens`."""

    text: str
    num_tokens: int
    finished: bool


def parse_chat_template_kwargs(value: dict[str, Any] | str | None) -> dict[str, Any]:
    """`chat_template_kwargs` as a dict: `None` is `{}`, a string is parsed as JSON (what the command line and TRL's
    `GRPOConfig` accept), and anything but a JSON object is refused."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"`chat_template_kwargs` must be a JSON object, got {value!r} ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"`chat_template_kwargs` must be a mapping (JSON object), got {type(value).__name__}")
    return dict(value)


def is_conversational_prompt(prompt: Any) -> bool:
    """Whether `prompt` is a list of `{"role", "content"}` messages (else it is used as plain text)."""
    return (
        isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]
    )


def encode_prompt(
    tokenizer, prompt: str | Sequence[dict[str, str]], chat_template_kwargs: dict[str, Any] | None = None
) -> list[int]:
    """
    Token ids of a prompt, exactly as TRL's `GRPOTrainer` builds them for generation.

    A conversational prompt (list of messages) goes through the chat template with `add_generation_prompt=True` and
    `chat_template_kwargs` (TRL's `GRPOConfig.chat_template_kwargs`, e.g. `{"enable_thinking": False}`); a plain string
    is tokenized as-is (with the tokenizer's usual special tokens; TRL applies no template, so no kwargs, to it).

    Example:
    ```python
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "2+2?"}], {"enable_thinking": False})
    ids = encode_prompt(tokenizer, "2+2=")
    ```
    """
    if is_conversational_prompt(prompt):
        ids = tokenizer.apply_chat_template(
            list(prompt),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **parse_chat_template_kwargs(chat_template_kwargs),
        )
        ids = ids["input_ids"]
    elif isinstance(prompt, str):
        ids = tokenizer(text=prompt)["input_ids"]
    else:
        raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def _eos_token_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if int(token_id) not in ids:
                ids.append(int(token_id))
    return ids


def sampling_generation_config(model, tokenizer, sampling: SamplingSettings | None = None) -> GenerationConfig:
    """
    The `GenerationConfig` of evaluation sampling: plain temperature / top-p / top-k sampling with `sampling`
    (default: `SamplingSettings()`).

    The model's `generation_config.json` often carries its own sampling defaults (e.g. `top_k=20, top_p=0.8,
    repetition_penalty=1.05`), and `transformers` fills every unset field from it, plus a global `top_k=50`. Every
    sampling knob is therefore set explicitly to the requested or the neutral value, so that `transformers` samples from
    the same distribution as vLLM with the same `SamplingParams`. End-of-sequence ids are the model's and the
    tokenizer's.
    """
    sampling = (sampling or SamplingSettings()).effective()
    eos = _eos_token_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return GenerationConfig(
        do_sample=not sampling.greedy,
        # Greedy decoding is do_sample=False; transformers refuses temperature 0, and ignores it when not sampling.
        temperature=sampling.temperature or 1.0,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=int(pad),
        use_cache=True,
    )


class TransformersGenerator:
    r"""
    Batched sampling with `transformers`: left-padded prompts, `num_return_sequences` samples per prompt.

    Args:
        model: a causal LM (a `PreTrainedModel` or a `PeftModel`).
        tokenizer: its tokenizer.
        sampling ([`SamplingSettings`], *optional*): how to sample (see [`sampling_generation_config`]). Its `seed` is
            not applied here: `generate` draws from torch's global generator, which the caller seeds.
        batch_size (`int`): sequences per `generate` call. With `batch_size >= n`, `batch_size // n` prompts with all
            their `n` samples; otherwise `batch_size` samples of one prompt per call.
        synced_gpus (`bool`): pass `synced_gpus=True` to `generate` (needed when the model is sharded across processes,
            e.g. DeepSpeed ZeRO-3, and the processes finish at different times).
        show_progress (`bool`): show a tqdm bar (in samples).

    Example:
    ```python
    generator = TransformersGenerator(model, tokenizer, SamplingSettings(max_new_tokens=64), batch_size=32)
    samples = generator.generate([encode_prompt(tokenizer, "2+2=")], n=8)  # samples[0]: 8 Completion objects
    ```
    """

    def __init__(
        self,
        model,
        tokenizer,
        sampling: SamplingSettings | None = None,
        *,
        batch_size: int = 64,
        synced_gpus: bool = False,
        show_progress: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.synced_gpus = synced_gpus
        self.show_progress = show_progress
        self.sampling = sampling or SamplingSettings()
        self.generation_config = sampling_generation_config(model, tokenizer, self.sampling)
        self.eos_token_ids = set(_eos_token_ids(model, tokenizer))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], n: int) -> list[Completion]:
        if n != 1 and self.sampling.greedy:
            # Greedy decoding has one continuation per prompt (transformers refuses num_return_sequences > 1 without
            # sampling): decode it once and repeat it, prompt-major like sampled rows.
            return [dataclasses.replace(c) for c in self._generate_batch(prompts, 1) for _ in range(n)]
        pad = self.generation_config.pad_token_id
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
        config = self.generation_config
        if n != 1:
            config = GenerationConfig.from_dict(config.to_dict())
            config.num_return_sequences = n
        kwargs = {"synced_gpus": True} if self.synced_gpus else {}
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            **kwargs,
        )
        completions = []
        for row in output[:, width:].tolist():  # rows are prompt-major: prompt 0's n samples, then prompt 1's, ...
            end = next((i for i, token in enumerate(row) if token in self.eos_token_ids), None)
            tokens = row if end is None else row[: end + 1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(Completion(text=text, num_tokens=len(tokens), finished=end is not None))
        return completions

    def generate(self, prompts: Sequence[Sequence[int]], n: int, desc: str | None = None) -> list[list[Completion]]:
        """`n` samples for each prompt (token ids), as a list (per prompt) of lists of [`Completion`]."""
        prompts = [list(ids) for ids in prompts]
        per_call = min(n, self.batch_size)
        prompts_per_call = max(1, self.batch_size // per_call)
        results: list[list[Completion]] = [[] for _ in prompts]
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        try:
            with tqdm(total=len(prompts) * n, desc=desc, unit="sample", disable=not self.show_progress) as bar:
                for start in range(0, len(prompts), prompts_per_call):
                    group = prompts[start : start + prompts_per_call]
                    done = 0
                    while done < n:
                        m = min(per_call, n - done)
                        batch = self._generate_batch(group, m)
                        for j in range(len(group)):
                            results[start + j].extend(batch[j * m : (j + 1) * m])
                        done += m
                        bar.update(len(group) * m)
        finally:
            if was_training:
                self.model.train()
        return results


# The values vLLM accepts for `max_lora_rank` (`vllm.config.lora.MaxLoRARanks`).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(adapter: str) -> int:
    """The `max_lora_rank` vLLM needs to serve `adapter` (a directory or Hub id): its largest rank (`r` and any
    `rank_pattern` entry), rounded up to a value vLLM accepts."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(adapter)
    ranks = [getattr(config, "r", None), *(getattr(config, "rank_pattern", None) or {}).values()]
    rank = max((int(r) for r in ranks if r), default=0)
    if rank < 1:
        raise ValueError(f"{adapter}: no LoRA rank `r` in its adapter_config.json; vLLM serves LoRA adapters only")
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"{adapter}: LoRA rank {rank} > {VLLM_LORA_RANKS[-1]}, the largest vLLM serves")


class VLLMGenerator:
    r"""
    Sampling with vLLM (imported lazily: only needed when this backend is used).

    Prompts are passed as token ids, so the chat template is applied exactly once, as in the transformers backend.
    The sampling parameters are passed explicitly, so the model's `generation_config.json` defaults do not apply.

    A LoRA `adapter` is served with vLLM's native LoRA support (`enable_lora=True`, a `LoRARequest` with every
    generation): the base weights are loaded once and the adapter is applied on the fly, without writing a merged
    checkpoint. `max_lora_rank` defaults to the adapter's rank (rounded up to a value vLLM accepts).

    `sampling.seed` seeds the engine; [`from_llm`] builds a generator on an existing engine instead.

    Example:
    ```python
    generator = VLLMGenerator("Qwen/Qwen2.5-3B-Instruct", sampling=SamplingSettings(max_new_tokens=4096, seed=0))
    samples = generator.generate([encode_prompt(tokenizer, messages)], n=32)
    generator = VLLMGenerator("Qwen/Qwen2.5-3B-Instruct", adapter="outputs/qwen-lora")  # LoRA, unmerged
    ```
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        sampling: SamplingSettings | None = None,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        show_progress: bool = True,
        adapter: str | None = None,
        max_lora_rank: int | None = None,
    ):
        from vllm import LLM

        self.sampling = sampling or SamplingSettings()
        self.show_progress = show_progress
        kwargs = {"max_model_len": max_model_len} if max_model_len else {}
        self.lora_request = None
        if adapter:
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=max_lora_rank or vllm_max_lora_rank(adapter))
            self.lora_request = LoRARequest("adapter", 1, adapter)
        self.sampling_seed = None  # the engine's own seed applies
        self.llm = LLM(
            model=model,
            tokenizer=tokenizer or model,
            seed=self.sampling.seed,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )

    @classmethod
    def from_llm(cls, llm, sampling: SamplingSettings | None = None, *, show_progress: bool = True) -> VLLMGenerator:
        """A generator on an existing `vllm.LLM` (e.g. the one a TRL trainer colocates with training).
        `sampling.seed` seeds every request (`SamplingParams(seed=...)`), so the samples do not depend on what the
        engine generated before."""
        generator = cls.__new__(cls)
        generator.llm = llm
        generator.sampling = sampling or SamplingSettings()
        generator.show_progress = show_progress
        generator.lora_request = None
        generator.sampling_seed = generator.sampling.seed
        return generator

    def sampling_params(self, n: int) -> dict[str, Any]:
        """The `SamplingParams` fields of `n` samples per prompt."""
        sampling = self.sampling.effective()
        params = dict(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            **({"top_k": sampling.top_k} if sampling.top_k > 0 else {}),
        )
        if self.sampling_seed is not None:
            params["seed"] = int(self.sampling_seed)
        return params

    def generate(self, prompts: Sequence[Sequence[int]], n: int, desc: str | None = None) -> list[list[Completion]]:
        """`n` samples for each prompt (token ids), as a list (per prompt) of lists of [`Completion`]."""
        from vllm import SamplingParams

        params = SamplingParams(**self.sampling_params(n))
        if desc and self.show_progress:
            logger.info("Generating %s with vLLM", desc)
        lora = {"lora_request": self.lora_request} if self.lora_request is not None else {}
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(ids)} for ids in prompts], params, use_tqdm=self.show_progress, **lora
        )
        return [
            [
                Completion(text=o.text, num_tokens=len(o.token_ids), finished=o.finish_reason == "stop")
                for o in output.outputs
            ]
            for output in outputs
        ]


class VLLMClientGenerator:
    r"""
    Sampling through a TRL `VLLMClient` (the vLLM server of `trl vllm-serve`, as `GRPOTrainer` uses it in server
    mode): prompts go as token ids, completions come back as token ids and are decoded with `tokenizer`. A completion
    is finished when it ends with an end-of-sequence token (the server returns it), as TRL counts truncation.

    Example:
    ```python
    generator = VLLMClientGenerator(trainer.vllm_generation.vllm_client, tokenizer, SamplingSettings(max_new_tokens=512))
    samples = generator.generate([encode_prompt(tokenizer, "2+2=")], n=4)
    ```
    """

    def __init__(
        self,
        client,
        tokenizer,
        sampling: SamplingSettings | None = None,
        *,
        eos_token_ids: Sequence[int] | None = None,
    ):
        self.client = client
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingSettings()
        ids = eos_token_ids if eos_token_ids is not None else [getattr(tokenizer, "eos_token_id", None)]
        self.eos_token_ids = {int(i) for i in ids if i is not None}

    def generate(self, prompts: Sequence[Sequence[int]], n: int, desc: str | None = None) -> list[list[Completion]]:
        """`n` samples for each prompt (token ids), as a list (per prompt) of lists of [`Completion`]."""
        if not prompts:
            return []
        sampling = self.sampling.effective()
        output = self.client.generate(
            prompts=[list(ids) for ids in prompts],
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            logprobs=None,
            generation_kwargs={"seed": sampling.seed},  # every request seeded: samples independent of earlier ones
        )
        rows = output["completion_ids"]  # prompt-major: the n samples of prompt 0, then those of prompt 1, ...
        if len(rows) != len(prompts) * n:
            raise RuntimeError(f"the vLLM server returned {len(rows)} completions for {len(prompts)} prompts x {n}")
        completions = [
            Completion(
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                num_tokens=len(ids),
                finished=bool(ids) and int(ids[-1]) in self.eos_token_ids,
            )
            for ids in rows
        ]
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_backend(backend: str = "auto") -> str:
    """
    The generation backend to use: `"vllm"` or `"transformers"`.

    `"auto"` picks vLLM when it is importable and CUDA is available, transformers otherwise. Asking for `"vllm"`
    without vLLM installed, or without a GPU, raises an error instead of silently falling back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "auto":
        return "vllm" if has_vllm and _cuda_available() else "transformers"
    if backend == "vllm":
        if not has_vllm:
            raise ImportError("backend='vllm' needs vLLM: pip install 'bandpo_trl[vllm]'")
        if not _cuda_available():
            raise RuntimeError("backend='vllm' needs a CUDA GPU; use backend='transformers' on CPU")
    return backend
