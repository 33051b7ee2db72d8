"""`BandAsyncGRPOConfig`: TRL's experimental `AsyncGRPOConfig` plus the options of the clipping rule.

TRL's asynchronous GRPO lives in `trl.experimental`, whose API may change in any release, so this module checks the
installed TRL against the versions it was written for before importing it, and `import bandpo_trl` never imports it
(`bandpo_trl.BandAsyncGRPOConfig` is resolved on first use).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from packaging.version import Version

from .clip_rules import ClipRule
from .config import BandGRPOConfig, validate_clip_rule_options

# TRL releases whose `AsyncGRPOTrainer.compute_loss` has the seam the Band trainer relies on (the clamp of the ratio
# to `[1 - self.epsilon_low, 1 + self.epsilon_high]` over the flat tensor of trained tokens): >= first, < second.
SUPPORTED_TRL = ("1.16", "1.17")


def require_async_grpo() -> None:
    """Raise an `ImportError` naming the installed TRL and the supported range unless TRL's experimental
    `AsyncGRPOTrainer` of a supported release can be imported."""
    import trl

    low, high = SUPPORTED_TRL
    found = getattr(trl, "__version__", "unknown")
    supported = f"trl>={low},<{high}"
    try:
        in_range = Version(low) <= Version(Version(found).base_version) < Version(high)
    except Exception:  # noqa: BLE001 - an unparsable version is reported below like an unsupported one
        in_range = False
    if not in_range:
        raise ImportError(
            f"BandAsyncGRPOTrainer builds on TRL's experimental AsyncGRPOTrainer as released in {supported}, whose "
            f"API changes between releases; found trl {found}. Install a supported TRL (pip install '{supported}') "
            "or use BandGRPOTrainer, which works with TRL's stable GRPOTrainer."
        )
    try:
        import trl.experimental.async_grpo  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"trl {found} is in the supported range ({supported}) but trl.experimental.async_grpo cannot be "
            f"imported: {error}"
        ) from error


require_async_grpo()

# TRL's classes are imported from here, after the version check, by the other async modules too.
from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer  # noqa: E402

__all__ = [
    "SUPPORTED_TRL",
    "AsyncGRPOConfig",
    "AsyncGRPOTrainer",
    "BandAsyncGRPOConfig",
    "require_async_grpo",
    "validate_async_band_options",
]

_SYNC_FIELDS = {f.name: f for f in fields(BandGRPOConfig)}


def _clip_option(name: str):
    # The clipping options are BandGRPOConfig's, with the same defaults and help texts.
    return field(default=_SYNC_FIELDS[name].default, metadata=dict(_SYNC_FIELDS[name].metadata))


@dataclass
class BandAsyncGRPOConfig(AsyncGRPOConfig):
    r"""
    Configuration for [`BandAsyncGRPOTrainer`]: every option of TRL's experimental
    [`~trl.experimental.async_grpo.AsyncGRPOConfig`], plus the per-token clipping rule of [`BandGRPOConfig`]
    (`clip_rule`, `band_divergence`, `band_delta`, `band_max_ratio`, `band_relax`, `dcpo_epsilon_low`,
    `dcpo_epsilon_high`), with the same defaults and checks.

    In asynchronous training a sample can be up to `max_staleness` policy versions old (a version is published every
    `weight_sync_steps` optimizer steps), and its old log-probs are the vLLM sampler's. That staleness is what moves
    the ratios away from 1, so Band acts on every step where the samples are stale; there is no
    `steps_per_generation` / `num_iterations` here.

    Example:
    ```python
    from bandpo_trl import BandAsyncGRPOConfig

    args = BandAsyncGRPOConfig(
        output_dir="qwen-bandpo-async",
        band_divergence="kl",
        band_delta=0.05,
        max_staleness=4,  # samples up to 4 policy versions old are trained on
        vllm_server_base_url="http://localhost:8000",
    )
    ```
    """

    clip_rule: str = _clip_option("clip_rule")
    band_divergence: str = _clip_option("band_divergence")
    band_delta: float = _clip_option("band_delta")
    band_max_ratio: float | None = _clip_option("band_max_ratio")
    band_relax: bool = _clip_option("band_relax")
    dcpo_epsilon_low: float = _clip_option("dcpo_epsilon_low")
    dcpo_epsilon_high: float = _clip_option("dcpo_epsilon_high")

    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Unset: on where a bf16-capable GPU (or XLA device) is present, off "
            "otherwise, so the same config runs on a CPU-only machine (TRL's AsyncGRPOConfig turns it on "
            "everywhere). Set it to force either way."
        },
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:
            from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

            self.bf16 = is_torch_bf16_gpu_available() or is_torch_xla_available()
        super().__post_init__()
        validate_async_band_options(self)


def validate_async_band_options(args) -> ClipRule:
    """Check the clipping options of `args` (a `BandAsyncGRPOConfig`, or a plain `AsyncGRPOConfig`, seen with the
    options' defaults) and return the clip rule.

    The checks are `BandGRPOConfig`'s that apply here: the rule must be registered or importable, its options in
    range, its bounds valid on a probe. TRL's asynchronous loss is always the token-level clipped surrogate (no
    sequence-level importance sampling, no other loss types; TRL itself refuses Liger), so every rule applies to it.
    """
    return validate_clip_rule_options(args)
