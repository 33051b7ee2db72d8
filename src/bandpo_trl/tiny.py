"""The embedded default's policy: a tiny causal LM and character tokenizer built locally, and its warm-up.

Nothing here touches the Hugging Face Hub, so `make train` runs on a fresh machine without network. RL needs a
policy that is diverse and imperfect (a random-init model never samples a correct answer, so every group has zero
advantage), hence the short supervised warm-up on the toy task before BandGRPO takes over.

Example:
```python
>>> from bandpo_trl.tiny import build_tiny_model, build_tiny_tokenizer
>>> tokenizer = build_tiny_tokenizer()
>>> tokenizer.decode(tokenizer("12+35=")["input_ids"])
'12+35='
>>> model = build_tiny_model(tokenizer)
>>> model.num_parameters() < 500_000
True
```
"""

from __future__ import annotations

import hashlib
import json
import os
import string

import torch
from accelerate import PartialState
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
# Characters the tokenizer knows one by one: printable ASCII plus newline and tab, enough for the toy task and for
# the math prompts (so the tiny model can also smoke-test the math pipeline). Anything else maps to UNK_TOKEN.
CHARACTERS = [c for c in string.printable if c not in "\r\x0b\x0c"]
# Role markers render as plain text, so the template needs no extra special tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
WARMUP_DIRNAME = "warmup"


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer, built with `tokenizers` and wrapped for `transformers`.

    One token per character of `CHARACTERS`, plus `<|endoftext|>` (eos), `<|pad|>` and `<|unk|>`. It has a chat
    template (`role: content` lines) so conversational prompts work too. Padding and truncation are on the left,
    as GRPO generation expects.
    """
    specials = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    vocab = {token: i for i, token in enumerate(specials + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character is its own pre-token; Fuse joins them back without the spaces WordLevel would insert.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        truncation_side="left",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised float32 Llama-architecture causal LM sized for CPU training in seconds.

    The vocabulary and the special token ids come from `tokenizer`; the same `seed` gives the same weights.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    # `from_config` draws the initial weights from torch's global generator: seed it here so the model is
    # reproducible whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def warm_up(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    dataset: Dataset,
    output_dir: str,
    max_steps: int = 300,
    learning_rate: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    bf16: bool = False,
    fp16: bool = False,
    use_cpu: bool | None = None,
) -> PreTrainedModel:
    """Supervised warm-up with TRL's `SFTTrainer` on a prompt/completion `dataset` (loss on the completion only).

    Keep it short: the point is a policy that sometimes answers right and samples diverse answers, so that GRPO
    groups have non-zero advantages, not a solved task. Saves nothing; see `warm_up_cached` for the cached version.

    `bf16`/`fp16` and `use_cpu` must be those of the RL run that follows in the same process: accelerate fixes the
    mixed precision and the device of a process the first time a trainer is built, and a later trainer asking for
    others fails or, for the device, generates with the model on one device and its inputs on the other. `use_cpu`
    None means the CPU only when there is no GPU.
    """
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        per_device_train_batch_size=batch_size,
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not torch.cuda.is_available() if use_cpu is None else use_cpu,
        logging_steps=max(1, max_steps // 5),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer.model


def warm_up_cached(output_dir: str, dataset: Dataset, model_kwargs: dict | None = None, **warmup_kwargs) -> str:
    """Build, warm up and save the tiny model and tokenizer to `output_dir/warmup`; return that path.

    A previous warm-up with the same settings and data is reused, so a rerun of `make train` skips it. The key
    is a hash of `model_kwargs`, `warmup_kwargs` and the dataset's rows.
    """
    model_kwargs = dict(model_kwargs or {})
    path = os.path.join(output_dir, WARMUP_DIRNAME)
    key = hashlib.sha256(
        json.dumps([model_kwargs, warmup_kwargs, dataset.to_list()], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    stamp = os.path.join(path, "warmup_key.txt")
    if os.path.isfile(stamp) and open(stamp).read().strip() == key:
        return path

    # Under several processes every one trains (the trainer's collectives need them all) and the main one saves.
    state = PartialState()
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, **model_kwargs)
    model = warm_up(model, tokenizer, dataset, output_dir=path, **warmup_kwargs)
    if state.is_main_process:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with open(stamp, "w") as f:
            f.write(key + "\n")
    state.wait_for_everyone()
    return path
