"""In-process stand-ins for the vLLM server of TRL's asynchronous GRPO trainer, serving samples from past policies.

TRL's `AsyncGRPOTrainer` trains on samples a vLLM server generated while training went on, so a sample may be
several policy versions old. These stand-ins reproduce that on a CPU, without vLLM, so that the asynchronous
trainers (TRL's and [`BandAsyncGRPOTrainer`]) can be tested and studied with a known staleness:

- [`SnapshotWeightTransfer`] implements TRL's weight-transfer protocol: each weight sync stores a copy of the
  weights it is sent, as the server would load them. The n-th sync of a fresh trainer publishes policy version n.
- [`StaleRolloutWorker`] implements TRL's rollout-worker protocol: it samples each group of completions from the
  stored version ``staleness`` syncs behind the trainer's (at least version 1), scores them, and hands the trainer
  each token's log-probability under that version at the sampling temperature (the "old" log-probs), tagged with
  the version. Samples are generated when the trainer asks for them, so every sample is exactly ``staleness``
  versions old when the trainer takes it from the queue (fewer during the first syncs).
- [`cpu_async_grpo`] lets TRL's trainer run on a CPU: TRL's tree-packed attention calls a FlashAttention-3 kernel
  downloaded from the Hub, and the trainer reads the CUDA device's name for its MFU metric. Inside the context the
  kernel is replaced by an eager PyTorch equivalent (the same varlen, bottom-right-causal contract) and MFU is off.

Example:
```python
from bandpo_trl import BandAsyncGRPOConfig, BandAsyncGRPOTrainer
from bandpo_trl.stale_rollouts import SnapshotWeightTransfer, StaleRolloutWorker, cpu_async_grpo

with cpu_async_grpo():
    transfer = SnapshotWeightTransfer()
    worker = StaleRolloutWorker(model_dir, tokenizer, dataset, transfer, staleness=2, num_generations=4)
    args = BandAsyncGRPOConfig(output_dir="out", token_budget=0, max_steps=8, per_device_train_batch_size=8,
                               num_generations=4, max_staleness=2, learning_rate=1e-3)
    trainer = BandAsyncGRPOTrainer(model_dir, args=args, processing_class=tokenizer, train_dataset=dataset,
                                   rollout_worker=worker, weight_transfer=transfer)
    trainer.train()
```
"""

from __future__ import annotations

import collections
import itertools
import queue
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

__all__ = ["SnapshotWeightTransfer", "StaleRolloutWorker", "cpu_async_grpo", "eager_varlen_attention"]


def eager_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> torch.Tensor:
    """FlashAttention's ``flash_attn_varlen_func`` in plain PyTorch, one segment at a time.

    ``query`` is (total_q, heads, dim), ``key``/``value`` (total_k, kv_heads, dim); segment ``s`` is rows
    ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` of the queries against rows ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]`` of the
    keys. As in FlashAttention, the causal mask is aligned to the bottom right (a segment's queries are the last of
    its keys) and ``window_size = (left, right)`` limits how far back (``left``) a query sees; ``-1`` is unlimited.
    """
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[2]
    scale = softmax_scale if softmax_scale is not None else dim**-0.5
    output = query.new_empty(query.shape)
    for s in range(len(cu_seqlens_q) - 1):
        q_start, q_end = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        k_start, k_end = int(cu_seqlens_k[s]), int(cu_seqlens_k[s + 1])
        q = query[q_start:q_end].float()
        k, v = key[k_start:k_end].float(), value[k_start:k_end].float()
        if kv_heads != heads:  # grouped-query attention
            k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        n_q, n_k = q.shape[0], k.shape[0]
        rows = torch.arange(n_q, device=query.device)[:, None] + (n_k - n_q)  # each query's own key position
        cols = torch.arange(n_k, device=query.device)[None, :]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device)
        if causal:
            allowed &= cols <= rows
        if window_size[0] >= 0:
            allowed &= cols >= rows - window_size[0]
        if window_size[1] >= 0:
            allowed &= cols <= rows + window_size[1]
        scores = scores.masked_fill(~allowed, float("-inf"))
        output[q_start:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(query.dtype)
    return output


class _EagerFlashAttention:
    """The interface TRL's tree attention uses from the FlashAttention kernel module."""

    flash_attn_varlen_func = staticmethod(eager_varlen_attention)


@contextmanager
def cpu_async_grpo():
    """Run TRL's `AsyncGRPOTrainer` (and [`BandAsyncGRPOTrainer`]) without CUDA inside this context.

    TRL 1.16's asynchronous trainer assumes a CUDA GPU in two places: its tree-packed attention calls a
    FlashAttention-3 kernel fetched from the Hub, and it reads the CUDA device name to look up peak FLOPs for its MFU
    metric. Inside the context the kernel is [`eager_varlen_attention`] and MFU is off (no peak FLOPs, as TRL does for
    an unknown device); both are restored on exit. Training itself is TRL's code, unchanged.
    """
    from trl.experimental.async_grpo import async_grpo_trainer, packing

    saved = packing._flash_attn, async_grpo_trainer.get_peak_flops_per_device
    packing._flash_attn = lambda: _EagerFlashAttention
    async_grpo_trainer.get_peak_flops_per_device = lambda accelerator, dtype: None
    try:
        yield
    finally:
        packing._flash_attn, async_grpo_trainer.get_peak_flops_per_device = saved


class SnapshotWeightTransfer:
    """TRL's weight-transfer protocol, keeping a CPU copy of the weights of every sync as a policy version.

    The trainer streams ``(name, tensor)`` pairs (base-checkpoint names, adapters merged) to `send_weights`; the n-th
    call stores them as ``snapshots[n]``, which is policy version n of a trainer that starts at version 0 (TRL bumps
    the version after each sync).
    """

    def __init__(self):
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def init_weight_transfer(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def send_weights(self, iterator: Iterator[tuple[str, torch.Tensor]]) -> None:
        self.snapshots[len(self.snapshots) + 1] = {
            name: tensor.detach().to("cpu", copy=True) for name, tensor in iterator
        }

    def resume(self) -> None:
        pass

    def destroy(self) -> None:
        pass


class _GenerateOnGet:
    """The rollout queue: a group of samples is generated when the trainer asks for a sample and none is left."""

    def __init__(self, worker: StaleRolloutWorker):
        self._worker = worker
        self._pending: collections.deque = collections.deque()

    def get(self, block: bool = True, timeout: float | None = None):
        if not self._pending:
            self._pending.extend(self._worker._generate_group())
        sample = self._pending.popleft()
        self._worker.served.append((sample.model_version, self._worker.model_version))
        return sample

    def put_nowait(self, sample) -> None:
        self._pending.append(sample)

    def qsize(self) -> int:
        return len(self._pending)


def _random_reward(prompts: list, completions: list[str], **kwargs) -> list[float]:
    # Scores unrelated to the task, so that every group has non-zero advantages on an untrained model; a checksum of
    # the text, so that the same completion gets the same score in every process and run.
    return [(zlib.crc32(completion.encode()) % 1000) / 1000.0 for completion in completions]


class StaleRolloutWorker:
    """TRL's rollout-worker protocol, sampling from the policy version ``staleness`` syncs behind the trainer's.

    Args:
        model: path of the model the trainer trains (its architecture; the weights come from the snapshots).
        tokenizer: the trainer's tokenizer (left padding).
        dataset: rows with a ``"prompt"`` (text, or a conversation the tokenizer's chat template renders), cycled.
        weight_transfer: the [`SnapshotWeightTransfer`] passed to the same trainer.
        staleness: how many versions behind the trainer's the generating policy is (``max(1, current - staleness)``).
        num_generations: completions per prompt (one group; advantages are normalised within it as TRL's worker
            does: ``(r - mean) / (std + 1e-8)``).
        max_completion_length: new tokens per completion at most (a completion ends at the first eos).
        temperature: sampling temperature; the old log-probs are those of the temperature-scaled distribution, which
            is also what the trainer scores (`AsyncGRPOConfig.temperature` must be the same).
        reward_func: ``(prompts, completions, **columns) -> list[float]``, called with the completions' texts and
            the prompt's other dataset columns (as TRL's reward functions are); by default a deterministic score
            unrelated to the task, so that advantages are non-zero even for an untrained model.
        seed: sampling seed; group ``g`` is sampled with seed ``seed + g`` from its own generator state, so the
            trainer's random state is untouched and runs are reproducible.

    Attributes:
        served: ``(sample version, trainer version)`` of every sample handed to the trainer, in order.
    """

    def __init__(
        self,
        model: str,
        tokenizer: PreTrainedTokenizerBase,
        dataset,
        weight_transfer: SnapshotWeightTransfer,
        *,
        staleness: int = 0,
        num_generations: int = 4,
        max_completion_length: int = 8,
        temperature: float = 1.0,
        reward_func: Callable[..., list[float]] | None = None,
        seed: int = 0,
    ):
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0 (versions behind the trainer's), got {staleness}")
        self.tokenizer = tokenizer
        self.weight_transfer = weight_transfer
        self.staleness = staleness
        self.num_generations = num_generations
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.reward_func = reward_func or _random_reward
        self.seed = seed
        self.generator = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self._loaded_version: int | None = None
        self._prompts = itertools.cycle(list(dataset))
        self._group_ids = itertools.count()
        self.model_version = 0
        self.served: list[tuple[int, int]] = []
        self.rollout_buffer = _GenerateOnGet(self)
        self.metrics_queue: queue.Queue = queue.Queue()

    # ----------------------------------------------------------------------------------------- the protocol
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def update_model_version(self, model_version: int) -> None:
        self.model_version = model_version

    def check_health(self, stale_after_s: float) -> None:
        pass

    # ----------------------------------------------------------------------------------------- generation
    def _load(self, version: int) -> None:
        if version == self._loaded_version:
            return
        if version not in self.weight_transfer.snapshots:
            raise RuntimeError(
                f"policy version {version} was never synced (synced: {sorted(self.weight_transfer.snapshots)}); "
                "pass the same SnapshotWeightTransfer to the trainer and to this worker"
            )
        result = self.generator.load_state_dict(self.weight_transfer.snapshots[version], strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"synced weights the generator does not have: {result.unexpected_keys[:5]}")
        self._loaded_version = version

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self.tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)

    @torch.no_grad()
    def _generate_group(self) -> list:
        from trl.experimental.async_grpo.async_rollout_worker import RolloutSample

        if self.model_version < 1:
            raise RuntimeError("no policy version has been synced yet: the trainer syncs its weights on train begin")
        version = max(1, self.model_version - self.staleness)
        self._load(version)
        group_id = next(self._group_ids)
        row = next(self._prompts)
        prompt_ids = self._prompt_ids(row["prompt"])
        eos = self.tokenizer.eos_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + group_id)
            generated = self.generator.generate(
                torch.tensor([prompt_ids] * self.num_generations),
                attention_mask=torch.ones(self.num_generations, len(prompt_ids), dtype=torch.long),
                do_sample=True,
                temperature=self.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=self.max_completion_length,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        completions = []
        for row_ids in generated[:, len(prompt_ids) :].tolist():
            completions.append(row_ids[: row_ids.index(eos) + 1] if eos in row_ids else row_ids)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        # As TRL's worker does: the prompt's other dataset columns (e.g. `answer`) reach the reward as lists.
        columns = {key: [value] * len(texts) for key, value in row.items() if key != "prompt"}
        rewards = self.reward_func(prompts=[row["prompt"]] * len(texts), completions=texts, **columns)
        rewards = np.asarray(rewards, dtype=float)
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        samples = []
        for ids, text, reward, advantage in zip(completions, texts, rewards, advantages, strict=True):
            input_ids = prompt_ids + ids
            logits = self.generator(torch.tensor([input_ids])).logits[0, :-1].float() / self.temperature
            token_logps = logits.log_softmax(-1).gather(-1, torch.tensor(input_ids[1:])[:, None])[:, 0]
            old_log_probs = np.zeros(len(input_ids), dtype=np.float32)
            old_log_probs[len(prompt_ids) :] = token_logps[len(prompt_ids) - 1 :].numpy()
            samples.append(
                RolloutSample(
                    prompt=row["prompt"],
                    completion=[{"role": "assistant", "content": text}],
                    input_ids=np.asarray(input_ids, dtype=np.int64),
                    completion_mask=np.asarray([0] * len(prompt_ids) + [1] * len(ids), dtype=np.int64),
                    old_log_probs=old_log_probs,
                    advantage=float(advantage),
                    model_version=version,
                    group_id=group_id,
                    metrics={"reward": float(reward), "reward_std": float(rewards.std())},
                    enqueued_at=time.time(),
                )
            )
        return samples
