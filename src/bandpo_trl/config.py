"""`BandGRPOConfig`: TRL's `GRPOConfig` plus the options of the clipping rule."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import torch
from trl import GRPOConfig

from .band import check_max_ratio
from .clip_metrics import invalid_bounds
from .clip_rules import ClipRule, available_clip_rules, get_clip_rule
from .divergences import available_divergences, resolve_divergence
from .utils import check_positive, is_import_path

# TRL loss types whose surrogate is the PPO ratio clip `clamp(r, 1 - eps_low, 1 + eps_high)`.
RATIO_CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@dataclass
class BandGRPOConfig(GRPOConfig):
    r"""
    Configuration for [`BandGRPOTrainer`]: every [`~trl.GRPOConfig`] option, plus the per-token clipping rule.

    With `clip_rule="band"` (the default) each completion token's ratio is clipped to the Band interval
    `[l(p), u(p)]` of its old probability `p`: the projection of the trust region `D_f(pi || pi_old) <= band_delta`
    onto that token. `clip_rule="clip"` keeps TRL's fixed `[1 - epsilon, 1 + epsilon_high]`; `"dcpo"` uses DCPO's
    dynamic adaptive bounds.

    Band only acts when the policy moves away from the policy that sampled the batch, i.e. with several
    optimizer steps per generation batch (`steps_per_generation > gradient_accumulation_steps` or
    `num_iterations > 1`). With TRL's defaults every ratio is exactly 1 and the trainer warns.

    Example:
    ```python
    from bandpo_trl import BandGRPOConfig

    args = BandGRPOConfig(
        output_dir="qwen-bandpo",
        band_divergence="kl",
        band_delta=0.05,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=4,
        steps_per_generation=16,  # 4 optimizer steps per generation batch
    )
    ```
    """

    clip_rule: str = field(
        default="band",
        metadata={
            "help": "Per-token ratio clipping rule, a name registered with `bandpo_trl.register_clip_rule`: 'band' "
            "(Band interval of the token's old probability), 'clip' (TRL's fixed [1 - epsilon, 1 + epsilon_high], "
            "unchanged) or 'dcpo' (DCPO's dynamic bounds); or an import path such as 'my_pkg.rules:my_rule' (the "
            "current directory is searched first) naming a rule its module registers, or a function "
            "(old_logps, args) -> (lower, upper) to register."
        },
    )
    band_divergence: str = field(
        default="kl",
        metadata={
            "help": "f-divergence of the trust region: 'kl' (KL(pi_old || pi), the paper's default), 'rkl', 'tv', "
            "'chi2', 'hellinger', a name registered with `bandpo_trl.register_divergence`, or an import path "
            "(the current directory is searched first): 'my_pkg.divergences:js' imports my_pkg.divergences and "
            "uses the divergence 'js' its import registers (or registers its function `js` as the generator f), "
            "'my_pkg.divergences.js_generator' registers that function as the generator f. A generator must be "
            "elementwise, convex, non-negative, finite on (0, inf) and 0 at 1; it is checked at start-up."
        },
    )
    band_delta: float = field(
        default=0.05,
        metadata={"help": "Trust-region radius delta of the Band interval (the paper uses 0.05 for kl, tv and chi2)."},
    )
    band_max_ratio: float | None = field(
        default=10.0,
        metadata={
            "help": "Cap on the upper ratio bound (the paper's 10). Also caps the DCPO upper bound. Tokens with "
            "p < 1e-6 get (0, cap), tokens with p > 1 - 1e-6 get (lim l, 1)."
        },
    )
    band_relax: bool = field(
        default=False,
        metadata={
            "help": "Paper ablation: widen each interval to its union with [1 - epsilon, 1 + epsilon_high], "
            "i.e. lower = min(l, 1 - epsilon), upper = max(u, 1 + epsilon_high). The paper reports it does worse."
        },
    )
    dcpo_epsilon_low: float = field(
        default=0.16,
        metadata={
            "help": "DCPO lower epsilon: l = 1/2 + 1/2 sqrt(max(1 - 4 eps_low / p, 0)). Used with clip_rule='dcpo'."
        },
    )
    dcpo_epsilon_high: float = field(
        default=0.2,
        metadata={"help": "DCPO upper epsilon: u = 1/2 + 1/2 sqrt(1 + 4 eps_high / p). Used with clip_rule='dcpo'."},
    )

    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Unset: on where a bf16-capable GPU (or XLA device) is present, off "
            "otherwise, so the same config runs on a CPU-only machine (TRL's GRPOConfig turns it on everywhere, "
            "and transformers then stops with 'Your setup doesn't support bf16/gpu'). Set it to force either way."
        },
    )

    def __post_init__(self):
        check_counts(self)  # before TRL's and transformers' own checks, which divide by some of them
        if self.bf16 is None and not self.fp16:
            from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

            self.bf16 = is_torch_bf16_gpu_available() or is_torch_xla_available()
        super().__post_init__()
        validate_band_options(self)
        # The trainer validates again only if one of these settings changed since (its warnings are then new ones).
        self._validated_settings = validated_settings(self)


# The options BandGRPOConfig adds to GRPOConfig, with their defaults: a plain GRPOConfig handed to
# BandGRPOTrainer (the one-import swap) gets exactly these.
BAND_DEFAULTS = {
    f.name: f.default for f in fields(BandGRPOConfig) if f.name not in {g.name for g in fields(GRPOConfig)}
}


def band_option(args, name: str):
    """`args.<name>`, or its BandGRPOConfig default when `args` is a plain `GRPOConfig`."""
    return getattr(args, name, BAND_DEFAULTS[name])


class _WithBandDefaults:
    """A read-only view of a plain `GRPOConfig` in which every `BandGRPOConfig` option has its default."""

    def __init__(self, args):
        object.__setattr__(self, "_args", args)

    def __getattr__(self, name):
        return band_option(self._args, name) if name in BAND_DEFAULTS else getattr(self._args, name)

    def __setattr__(self, name, value):
        raise AttributeError(f"the config seen by a clip rule is read-only (tried to set {name!r})")


def with_band_defaults(args):
    """`args` itself when it has every `BandGRPOConfig` option, else a read-only view of it with their defaults: the
    `args` a clip rule receives, so that `args.band_delta` works for a plain `GRPOConfig` too."""
    return args if all(hasattr(args, name) for name in BAND_DEFAULTS) else _WithBandDefaults(args)


# The options of the built-in rules: one that the chosen rule does not read, set to another value, has no effect.
RULE_OPTIONS = (
    "band_divergence",
    "band_delta",
    "band_max_ratio",
    "band_relax",
    "dcpo_epsilon_low",
    "dcpo_epsilon_high",
)

# Old log-probabilities a rule's bounds are checked on before training: the tail and head rules, the buckets' edges.
_PROBE_PROBS = (0.0, 1e-9, 1e-6, 1e-4, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999, 1 - 1e-7, 1.0)


def check_clip_rule(rule: ClipRule, args) -> None:
    """Call `rule` once on a (2, 14) batch of old log-probabilities (from p = 0 to p = 1) and raise a `ValueError`
    naming the rule unless it returns two bounds, each a float or a tensor broadcastable to the batch, with
    `lower <= 1 <= upper` everywhere. Microseconds; run by `validate_band_options` before any model is loaded."""
    logps = torch.tensor(_PROBE_PROBS, dtype=torch.float32).log().expand(2, -1).clone()
    where = f"clip rule {rule.name!r} ({getattr(rule.bounds, '__module__', '?')}.{getattr(rule.bounds, '__qualname__', rule.bounds)})"
    try:
        with torch.no_grad():
            result = rule(logps, with_band_defaults(args))
    except Exception as error:  # noqa: BLE001 - any failure of the user's rule is reported with its cause
        raise ValueError(
            f"{where} raised {type(error).__name__}: {error} when called on a (2, {len(_PROBE_PROBS)}) float32 tensor "
            "of old log-probabilities; a rule maps (old_logps, args) to (lower, upper)"
        ) from error
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise ValueError(f"{where} must return a pair (lower, upper), got {type(result).__name__} {result!r:.80}")
    bounds = []
    for label, bound in zip(("lower", "upper"), result, strict=True):
        if not isinstance(bound, torch.Tensor | float | int) or isinstance(bound, bool):
            raise ValueError(f"{where}: {label} must be a float or a tensor, got {type(bound).__name__}")
        try:
            bounds.append(torch.as_tensor(bound, dtype=logps.dtype).expand_as(logps))
        except RuntimeError as error:
            raise ValueError(
                f"{where}: {label} of shape {tuple(torch.as_tensor(bound).shape)} does not broadcast to the old "
                f"log-probabilities' shape {tuple(logps.shape)}"
            ) from error
    bad = invalid_bounds(logps, *bounds)
    if bad.any():
        index = int(bad.flatten().nonzero()[0])
        p = _PROBE_PROBS[index % len(_PROBE_PROBS)]
        lower, upper = (float(b.flatten()[index]) for b in bounds)
        raise ValueError(
            f"{where} returned bounds that violate lower <= 1 <= upper: lower = {lower:.6g}, upper = {upper:.6g} at "
            f"old probability {p:.6g}. An interval that excludes ratio 1 clips tokens the policy has not moved"
        )


# Everything `validate_band_options` reads: a config whose values are unchanged since it was validated is not checked
# (nor warned about) again.
VALIDATED_SETTINGS = (
    "clip_rule",
    *RULE_OPTIONS,
    "epsilon",
    "epsilon_high",
    "importance_sampling_level",
    "loss_type",
    "use_liger_kernel",
    "use_vllm",
    "vllm_importance_sampling_correction",
    "num_iterations",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "max_steps",
    "num_train_epochs",
    "save_strategy",
    "save_steps",
)


def validated_settings(args) -> tuple:
    """The values of `VALIDATED_SETTINGS` in `args` (a plain `GRPOConfig` reads as the BandGRPOConfig defaults)."""
    view = with_band_defaults(args)
    return tuple(getattr(view, name, None) for name in VALIDATED_SETTINGS)


def is_validated(args) -> bool:
    """Whether `args` is a config validated when it was built, with none of the settings checked changed since."""
    return getattr(args, "_validated_settings", None) == validated_settings(args)


def check_counts(args) -> None:
    """Refuse counts that are zero or negative where TRL and transformers need a positive one (they would divide by
    them or silently read them as something else), naming the value and what is accepted.

    Raises:
        ValueError: `num_iterations`, `gradient_accumulation_steps` or `steps_per_generation` below 1; `max_steps`
            neither positive nor -1; `num_train_epochs <= 0` when `max_steps` is -1; `save_steps <= 0` with
            `save_strategy="steps"`.
    """
    for name, accepted in (
        ("num_iterations", "(1 or more)"),
        ("gradient_accumulation_steps", "(1 or more)"),
        ("steps_per_generation", "(1 or more), or unset to use gradient_accumulation_steps"),
    ):
        value = getattr(args, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer {accepted}, got {value!r}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(
            f"max_steps must be a positive number of optimizer steps, or -1 (the default) to train for "
            f"num_train_epochs, got {args.max_steps}"
        )
    if args.max_steps == -1 and args.num_train_epochs <= 0:
        raise ValueError(
            f"num_train_epochs must be > 0 when max_steps=-1 (the default: train for num_train_epochs), got "
            f"{args.num_train_epochs}; or set max_steps to a positive number of optimizer steps"
        )
    strategy = getattr(args.save_strategy, "value", args.save_strategy)
    if strategy == "steps" and args.save_steps <= 0:
        raise ValueError(
            f"save_steps must be > 0 with save_strategy='steps' (a number of optimizer steps, or a fraction of the "
            f"run below 1), got {args.save_steps}; set save_strategy='no' to save no checkpoints"
        )


def validate_clip_rule_options(args) -> ClipRule:
    """The checks of the clipping options that hold for every trainer of the package (`BandGRPOConfig` and
    `BandAsyncGRPOConfig`): the rule is registered (or an importable path), the divergence is known, the numbers are
    in range, the rule's bounds pass a probe. Warns when options the rule does not read are set. Returns the rule.
    """
    rule = get_clip_rule(band_option(args, "clip_rule"))
    divergence = band_option(args, "band_divergence")
    if not is_import_path(divergence) and divergence not in available_divergences():
        raise ValueError(
            f"band_divergence {divergence!r} is unknown; accepted: {', '.join(available_divergences())}, an import "
            "path such as 'my_pkg.divergences:js' (or register one with bandpo_trl.register_divergence before "
            "building the config)"
        )
    try:
        resolve_divergence(divergence)  # imports and registers an import path; a registered name is kept
    except ValueError as error:
        raise ValueError(
            f"band_divergence {divergence!r} is not a registered divergence (accepted: "
            f"{', '.join(available_divergences())}); as an import path: {error}"
        ) from error
    for name in ("band_delta", "dcpo_epsilon_low", "dcpo_epsilon_high"):
        check_positive(name, band_option(args, name))
    check_max_ratio(band_option(args, "band_max_ratio"), "band_max_ratio")
    warn_on_unread_options(args, rule)
    check_clip_rule(rule, args)
    return rule


def validate_band_options(args) -> None:
    """Check the clipping options of `args` (a `BandGRPOConfig`) against each other and against TRL's options.

    Raises `ValueError` naming the bad value and what is accepted; warns when the configuration makes the
    clipping rule a no-op, and when options the rule does not read are set.
    """
    check_counts(args)
    warn_on_mid_batch_checkpoints(args)
    rule = validate_clip_rule_options(args)
    if rule.trl_clip:
        return  # TRL's own clip: every TRL option stays available

    if args.importance_sampling_level != "token":
        raise ValueError(
            f"clip_rule={rule.name!r} bounds each token's ratio, but importance_sampling_level="
            f"{args.importance_sampling_level!r} uses one ratio per sequence; set importance_sampling_level='token' "
            "or clip_rule='clip'"
        )
    if args.loss_type not in RATIO_CLIP_LOSS_TYPES:
        raise ValueError(
            f"clip_rule={rule.name!r} replaces the ratio clip, but loss_type={args.loss_type!r} has none; accepted "
            f"loss types: {', '.join(RATIO_CLIP_LOSS_TYPES)} (or use clip_rule='clip')"
        )
    if args.use_liger_kernel:
        raise ValueError(
            f"clip_rule={rule.name!r} is not available with use_liger_kernel=True: Liger's fused GRPO loss takes only "
            "scalar epsilons. Set use_liger_kernel=False or clip_rule='clip'"
        )
    if is_on_policy(args):
        warnings.warn(
            f"clip_rule={rule.name!r} has no effect with this configuration: gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} is a multiple of steps_per_generation * num_iterations = "
            f"{args.steps_per_generation} * {args.num_iterations}, so every update uses fresh samples, the ratio "
            "is exactly 1 and no clip can act. Set steps_per_generation > gradient_accumulation_steps (e.g. 4x, as "
            "in the paper) or num_iterations > 1.",
            UserWarning,
            stacklevel=3,
        )


def trl_epsilons_read(args, rule: ClipRule) -> set[str]:
    """Which of TRL's `epsilon` / `epsilon_high` a rule that declares its options reads: both under a `trl_clip` rule
    (TRL's loss) and under `band_relax` (the union with TRL's interval), else those it lists (`epsilon_high` defaults
    to `epsilon`, so a rule that reads `epsilon_high` reads `epsilon` too)."""
    if rule.trl_clip or ("band_relax" in rule.options and band_option(args, "band_relax")):
        return {"epsilon", "epsilon_high"}
    read = {"epsilon", "epsilon_high"}.intersection(rule.options)
    return read | {"epsilon"} if "epsilon_high" in read else read


def warn_on_unread_options(args, rule: ClipRule) -> None:
    """Warn when options that `rule` does not read are set to non-default values: they would change nothing (e.g.
    `band_delta` with `clip_rule="dcpo"`, or TRL's `epsilon_high` with `clip_rule="band"`). A rule that declares no
    options is not checked."""
    if rule.options is None:
        return
    unread = [
        f"{name}={band_option(args, name)!r}"
        for name in RULE_OPTIONS
        if name not in rule.options and band_option(args, name) != BAND_DEFAULTS[name]
    ]
    read = trl_epsilons_read(args, rule)
    # TRL's defaults: epsilon 0.2, epsilon_high unset (= epsilon), so epsilon_high counts as set where it differs.
    if "epsilon" not in read and args.epsilon != GRPOConfig.epsilon:
        unread.append(f"epsilon={args.epsilon!r}")
    if "epsilon_high" not in read and args.epsilon_high not in (None, args.epsilon):
        unread.append(f"epsilon_high={args.epsilon_high!r}")
    if unread:
        reads = ", ".join(rule.options) if rule.options else "none of them"
        if any(entry.startswith("epsilon") for entry in unread):
            reads += "; TRL's epsilon and epsilon_high only with band_relax=True or when the rule lists them"
        warnings.warn(
            f"clip_rule={rule.name!r} does not read {', '.join(unread)}: these settings have no effect (it reads "
            f"{reads}). Remove them, or choose a rule that uses them (available: {', '.join(available_clip_rules())}).",
            UserWarning,
            stacklevel=5,
        )


def _generate_every(args) -> int:
    # TRL's generation period in micro-steps: a new generation batch every steps_per_generation * num_iterations.
    return (args.steps_per_generation or args.gradient_accumulation_steps) * args.num_iterations


def is_on_policy(args) -> bool:
    """True when every optimizer step is taken on samples from the very weights it updates, so the ratio the clip
    sees is exactly 1 and no clipping rule can act: `gradient_accumulation_steps` is a multiple of
    `steps_per_generation * num_iterations`. (With vLLM's importance-sampling correction TRL still computes
    `old_per_token_logps` then, see `computes_old_logps`, but from the same weights: the ratio is still 1.)"""
    return args.gradient_accumulation_steps % _generate_every(args) == 0


def computes_old_logps(args) -> bool:
    """Whether TRL's `GRPOTrainer` computes `old_per_token_logps` for its batches: TRL 1.16's own condition, when
    generation and optimizer steps are misaligned or when vLLM's importance-sampling correction needs them."""
    uses_vllm_correction = getattr(args, "use_vllm", False) and getattr(
        args, "vllm_importance_sampling_correction", False
    )
    return not is_on_policy(args) or bool(uses_vllm_correction)


def warn_on_mid_batch_checkpoints(args) -> None:
    """Warn when checkpoints fall inside a generation batch: a run resumed there draws a fresh batch for the
    remaining steps and does not match the uninterrupted run."""
    strategy = getattr(args.save_strategy, "value", args.save_strategy)
    save_steps = args.save_steps
    if strategy != "steps" or not save_steps or save_steps < 1 or save_steps != int(save_steps):
        return
    steps_per_batch = _generate_every(args) / args.gradient_accumulation_steps
    if steps_per_batch > 1 and steps_per_batch == int(steps_per_batch) and int(save_steps) % int(steps_per_batch):
        warnings.warn(
            f"save_steps={int(save_steps)} is not a multiple of the {int(steps_per_batch)} optimizer steps per "
            f"generation batch (steps_per_generation {args.steps_per_generation} x num_iterations "
            f"{args.num_iterations} / gradient_accumulation_steps {args.gradient_accumulation_steps}): a run resumed "
            "from such a checkpoint generates a new batch mid-way and diverges from the uninterrupted run. Use a "
            f"multiple of {int(steps_per_batch)}.",
            UserWarning,
            stacklevel=3,
        )
