"""The ablation's statistics (docs/ablation.md §4): per-run outcomes, paired contrasts with the pre-registered
multiplicity handling, and E1b's per-prompt analysis. Means and 95% t-intervals are the study's (`benchmarks.study`);
the Bonferroni-adjusted intervals of the confirmatory family use exact t quantiles (`t_quantile`)."""

from __future__ import annotations

import math
import statistics

from benchmarks import study
from benchmarks.toy_reproduction import BUCKETS

# E1's confirmatory family: three contrasts at a family-wise 5%, i.e. each a two-sided 1 - 0.05/3 interval.
CONFIRMATORY_LEVEL = 1 - 0.05 / 3
# (rule, baseline, family) in the order of the tables.
E1_CONTRASTS = [
    ("band_upper", "clip", "confirmatory"),
    ("band_lower", "clip", "confirmatory"),
    ("band_upper", "flat_upper", "confirmatory"),
    ("band_kl", "clip", "secondary"),
    ("clip_higher", "clip", "secondary"),
    ("flat_upper", "clip", "secondary"),
    ("band_kl", "band_upper", "secondary"),
    ("band_kl", "band_lower", "secondary"),
]
# E1b: the slope of Band KL - clip is the one confirmatory test (95%); the rest is secondary.
E1B_CONTRASTS = [
    ("band_kl", "clip", "confirmatory"),
    ("band_upper", "clip", "secondary"),
    ("band_lower", "clip", "secondary"),
    ("flat_upper", "clip", "secondary"),
    ("band_upper", "flat_upper", "secondary"),
]
E1_OUTCOMES = [  # (key, label, digits)
    ("steps_to_p05", "optimizer steps to mean p(z) > 0.5", 1),
    ("batches_to_p05", "generation batches to p > 0.5", 1),
    ("steps_to_r09", "optimizer steps to reward >= 0.9", 1),
    ("entropy_to_p05", "mean token entropy until p > 0.5 (nats)", 3),
    ("pre/pos_clip_up/p<0.1", "rewarded tokens with old p < 0.1 clipped up, until p > 0.5", 3),
    ("pre/neg_clip_down/p<0.01", "A < 0 tokens with old p < 0.01 clipped down, until p > 0.5", 3),
    ("pre/neg_clip_down/p0.1-0.5", "A < 0 tokens with old p in [0.1, 0.5) clipped down, until p > 0.5", 3),
]


# ----------------------------------------------------------------------------------------------------- t intervals


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function. With t = sqrt(df) tan(theta) the density becomes
    c cos(theta)^(df - 1) on (-pi/2, pi/2), c = Gamma((df + 1) / 2) / (sqrt(pi) Gamma(df / 2)); Simpson's rule on that
    smooth, bounded integrand."""
    if df < 1:
        raise ValueError(f"a t distribution needs df >= 1, got df={df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    n = 2000
    h = theta / n
    total = sum((1 if k in (0, n) else 4 if k % 2 else 2) * math.cos(k * h) ** (df - 1) for k in range(n + 1))
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    half = c * total * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with df degrees of freedom, 0.5 <= q < 1 (bisection on `t_cdf`)."""
    if not 0.5 <= q < 1:
        raise ValueError(f"t_quantile takes 0.5 <= q < 1, got q={q}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval at `level`: at 0.95 the study's own (`study.mean_ci`), otherwise with the exact
    quantile t((1 + level) / 2, n - 1)."""
    if level == 0.95:
        return study.mean_ci(values)
    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) < 2:
        return (statistics.fmean(values) if values else math.nan), math.nan, math.nan
    mean = statistics.fmean(values)
    half = t_quantile((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def steps_call(ci: tuple[float, float, float], baseline: str) -> str:
    """The pre-registered call on a paired difference in steps (rule - baseline): faster when the whole interval is
    below 0, slower when above, else no detectable difference."""
    _, lo, hi = ci
    if math.isnan(lo):
        return "not enough seeds"
    if hi < 0:
        return f"faster than {baseline}"
    if lo > 0:
        return f"slower than {baseline}"
    return "no detectable difference"


def slope_call(ci: tuple[float, float, float], baseline: str) -> str:
    """The call on the slope of (rule - baseline) steps against log10 start p: rising means the rule's gain over the
    baseline is larger for rarer answers (its difference is more negative at low p)."""
    _, lo, hi = ci
    if math.isnan(lo):
        return "not enough seeds"
    if lo > 0:
        return f"rises with start p: the gain over {baseline} is larger for rarer answers"
    if hi < 0:
        return f"falls with start p: the gain over {baseline} is larger for more frequent answers"
    return "no detectable dependence on start p"


def level_of(family: str) -> float:
    return CONFIRMATORY_LEVEL if family == "confirmatory" else 0.95


# ----------------------------------------------------------------------------------------------------- per run


def run_metrics(run: dict, budget: int, steps_per_generation: int) -> dict:
    """The study's E1 outcomes of a run (`study.e1_run_metrics`) plus clip fractions by old-probability bucket over
    the steps up to the p > 0.5 crossing (`pre/...`): A > 0 tokens clipped up, A < 0 tokens clipped down, with counts."""
    out = study.e1_run_metrics(run, budget, steps_per_generation)
    pre = [s for s in run["steps"] if s["step"] <= out["steps_to_p05"]]
    for b in BUCKETS:
        out[f"pre/pos_clip_up/{b}"] = study.bucket_fraction(pre, "study/pos_clip_high", "study/pos_tokens", b)
        out[f"pre/neg_clip_down/{b}"] = study.bucket_fraction(pre, "study/neg_clip_low", "study/neg_tokens", b)
        out[f"pre/neg_tokens/{b}"] = sum(s.get(f"study/neg_tokens/{b}", 0.0) for s in pre)
        out[f"pre/neg_clipped/{b}"] = sum(s.get(f"study/neg_clip_low/{b}", 0.0) for s in pre)
        out[f"pre/pos_tokens/{b}"] = sum(s.get(f"study/pos_tokens/{b}", 0.0) for s in pre)
        out[f"pre/pos_clipped/{b}"] = sum(s.get(f"study/pos_clip_high/{b}", 0.0) for s in pre)
        out[f"neg_clip_down/{b}"] = study.bucket_fraction(run["steps"], "study/neg_clip_low", "study/neg_tokens", b)
    low = ("p<0.01", "p0.01-0.1")
    den = sum(out[f"pre/pos_tokens/{b}"] for b in low)
    out["pre/pos_clip_up/p<0.1"] = sum(out[f"pre/pos_clipped/{b}"] for b in low) / den if den else math.nan
    return out


def contrast(metrics: dict, rule: str, baseline: str, key: str, level: float) -> dict:
    diffs = study.paired_differences(
        {s: m[key] for s, m in metrics[rule].items()}, {s: m[key] for s, m in metrics[baseline].items()}
    )
    ci = interval(diffs, level)
    return {"pairs": len(diffs), "diffs": diffs, "ci": ci, "level": level, "call": steps_call(ci, baseline)}


def rule_table(metrics: dict, outcomes: list, labels: dict) -> tuple[dict, list[str]]:
    """Mean [95% CI] over seeds of each outcome, per rule."""
    summary, lines = {}, ["| rule | seeds | " + " | ".join(label for _, label, _ in outcomes) + " |"]
    lines.append("|---" * (len(outcomes) + 2) + "|")
    for rule, per_seed in metrics.items():
        summary[rule] = {"seeds": sorted(per_seed)}
        cells = []
        for key, _, digits in outcomes:
            values = {s: m[key] for s, m in per_seed.items()}
            summary[rule][key] = {"per_seed": values, "ci": study.mean_ci(list(values.values()))}
            cells.append(study.fmt_ci(summary[rule][key]["ci"], digits))
        censored = sum(bool(m.get("p05_censored")) for m in per_seed.values())
        summary[rule]["p05_censored"] = censored
        lines.append(f"| {labels[rule]} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return summary, lines


def clip_count(per_seed: dict, kind: str, bucket: str) -> str:
    """'clipped / tokens' of one kind (`neg`: A < 0 clipped down, `pos`: A > 0 clipped up) summed over seeds."""
    clipped = sum(m[f"pre/{kind}_clipped/{bucket}"] for m in per_seed.values())
    tokens = sum(m[f"pre/{kind}_tokens/{bucket}"] for m in per_seed.values())
    return f"{clipped:.0f} / {tokens:.0f}"


def e1_tables(metrics: dict, labels: dict) -> tuple[dict, str]:
    rules, lines = rule_table(metrics, E1_OUTCOMES, labels)
    contrasts = []
    lines += ["", "Paired contrasts (rule - baseline, same seed), mean [CI]; confirmatory: Bonferroni over 3, "
              f"{CONFIRMATORY_LEVEL:.2%} intervals; secondary: 95%, unadjusted.", "",
              "| contrast | family | pairs | optimizer steps to mean p(z) > 0.5 | optimizer steps to reward >= 0.9 "
              "| generation batches to p > 0.5 |", "|---|---|---|---|---|---|"]  # fmt: skip
    for rule, baseline, family in E1_CONTRASTS:
        if rule not in metrics or baseline not in metrics:
            continue
        entry = {"rule": rule, "baseline": baseline, "family": family}
        entry["steps_to_p05"] = contrast(metrics, rule, baseline, "steps_to_p05", level_of(family))
        entry["steps_to_r09"] = contrast(metrics, rule, baseline, "steps_to_r09", 0.95)
        entry["batches_to_p05"] = contrast(metrics, rule, baseline, "batches_to_p05", 0.95)
        contrasts.append(entry)
        cells = [
            f"{study.fmt_ci(entry[k]['ci'], 1, sign=True)} ({entry[k]['call']})"
            for k in ("steps_to_p05", "steps_to_r09", "batches_to_p05")
        ]
        level = f"{family}, {level_of(family):.2%}" if family == "confirmatory" else family
        lines.append(f"| {labels[rule]} - {labels[baseline]} | {level} | {entry['steps_to_p05']['pairs']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "Clipped tokens until the p > 0.5 crossing, summed over seeds (clipped / tokens):", "",
              "| rule | A < 0, old p < 0.01, clipped down | A < 0, old p 0.01-0.1 | A < 0, old p 0.1-0.5 "
              "| A > 0, old p 0.01-0.1, clipped up | A > 0, old p 0.1-0.5 |", "|---|---|---|---|---|---|"]  # fmt: skip
    for rule, per_seed in metrics.items():
        cells = [clip_count(per_seed, "neg", b) for b in BUCKETS[:3]]
        cells += [clip_count(per_seed, "pos", b) for b in BUCKETS[1:3]]
        lines.append(f"| {labels[rule]} | " + " | ".join(cells) + " |")
    return {"rules": rules, "contrasts": contrasts}, "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- E1b


def e1b_prompt_steps(run: dict, budget: int) -> list[tuple[int, bool]]:
    """Per prompt: (first optimizer step after which its exact p(z) exceeds 0.5, censored); a prompt that never
    crosses within the budget counts as the budget, flagged."""
    probe = run["probe"]
    out = []
    for i in range(len(probe[0]["p_per_prompt"])):
        step = study.first_step([(r["step"], r["p_per_prompt"][i]) for r in probe], 0.5, strict=True)
        out.append((budget, True) if step is None else (step, False))
    return out


def ols(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def thirds(start: list[float]) -> list[list[int]]:
    """Prompt indices in three groups by start p (lowest 11, middle 10, highest 11 of 32)."""
    order = sorted(range(len(start)), key=lambda i: start[i])
    n = len(order)
    cut1, cut2 = round(n / 3 + 0.01), n - round(n / 3 + 0.01)
    return [order[:cut1], order[cut1:cut2], order[cut2:]]


def e1b_contrast(prompt_steps: dict, rule: str, baseline: str, start: list[float], level: float) -> dict:
    """Per seed: d_i = steps(rule) - steps(baseline) on each prompt i; their mean over prompts, and the least-squares
    intercept and slope of d_i on log10(start p_i); CIs over seeds (the seeds are the independent replicates)."""
    xs = [math.log10(p) for p in start]
    seeds = [s for s in sorted(prompt_steps[rule]) if s in prompt_steps[baseline]]
    per_seed = {}
    for s in seeds:
        d = [a[0] - b[0] for a, b in zip(prompt_steps[rule][s], prompt_steps[baseline][s], strict=True)]
        intercept, slope = ols(xs, d)
        per_seed[s] = {"mean": statistics.fmean(d), "slope": slope, "intercept": intercept,
                       "thirds": [statistics.fmean(d[i] for i in group) for group in thirds(start)]}  # fmt: skip
    out = {"pairs": len(seeds), "level": level}
    for key in ("mean", "slope", "intercept"):
        values = [per_seed[s][key] for s in seeds]
        out[key] = {"per_seed": values, "ci": interval(values, level if key == "slope" else 0.95)}
    out["thirds"] = [study.mean_ci([per_seed[s]["thirds"][j] for s in seeds]) for j in range(3)]
    out["mean"]["call"] = steps_call(out["mean"]["ci"], baseline)
    out["slope"]["call"] = slope_call(out["slope"]["ci"], baseline)
    return out


def start_spread(start: list[float]) -> dict:
    from benchmarks.ablation_tasks import e1b_frequency

    targets = [math.log(e1b_frequency(i)) for i in range(len(start))]
    return {
        "min": min(start), "median": statistics.median(start), "max": max(start),
        "max_over_min": max(start) / min(start),
        "log_correlation_with_target": statistics.correlation(targets, [math.log(p) for p in start]),
    }  # fmt: skip


def e1b_tables(prompt_steps: dict, start: list[float], metrics: dict, labels: dict) -> tuple[dict, str]:
    xs = [math.log10(p) for p in start]
    spread = start_spread(start)
    lines = [f"Start p(z) over the 32 prompts (exact, step 0): {spread['min']:.4f} to {spread['max']:.4f} "
             f"(median {spread['median']:.4f}, ratio {spread['max_over_min']:.1f}); correlation of log start p with "
             f"log target frequency {spread['log_correlation_with_target']:.3f}.", ""]  # fmt: skip
    groups = thirds(start)
    ranges = [f"{min(start[i] for i in g):.4f}-{max(start[i] for i in g):.4f}" for g in groups]
    header = ("| rule | seeds | steps to mean p(z) > 0.5 | per-prompt steps to p > 0.5, mean over prompts "
              "| slope of steps on log10 start p | " + " | ".join(f"steps, start p {r}" for r in ranges)
              + " | prompt-runs censored |")  # fmt: skip
    lines += [header, "|---" * 9 + "|"]
    rules = {}
    for rule, per_seed in prompt_steps.items():
        seeds = sorted(per_seed)
        fits = {s: ols(xs, [k for k, _ in per_seed[s]]) for s in seeds}
        entry = {
            "seeds": seeds,
            "steps_to_p05": study.mean_ci([metrics[rule][s]["steps_to_p05"] for s in seeds]),
            "prompt_mean": study.mean_ci([statistics.fmean(k for k, _ in per_seed[s]) for s in seeds]),
            "slope": study.mean_ci([fits[s][1] for s in seeds]),
            "thirds": [study.mean_ci([statistics.fmean(per_seed[s][i][0] for i in g) for s in seeds]) for g in groups],
            "censored": sum(c for s in seeds for _, c in per_seed[s]),
        }
        rules[rule] = entry
        cells = [study.fmt_ci(entry[k], 1) for k in ("steps_to_p05", "prompt_mean")]
        cells += [study.fmt_ci(entry["slope"], 2, sign=True)] + [study.fmt_ci(t, 1) for t in entry["thirds"]]
        lines.append(f"| {labels[rule]} | {len(seeds)} | " + " | ".join(cells) + f" | {entry['censored']} |")
    lines += ["", "Paired per-prompt differences (rule - baseline, same seed and prompt): mean over prompts, and the "
              "slope of the difference on log10 start p (per seed, then mean [CI] over seeds). Confirmatory: the "
              "slope of Band KL - clip, 95%; the rest secondary, 95%.", "",
              "| contrast | family | pairs | mean difference (steps) | slope (steps per decade of start p) | "
              + " | ".join(f"difference, start p {r}" for r in ranges) + " |", "|---" * 8 + "|"]  # fmt: skip
    contrasts = {}
    for rule, baseline, family in E1B_CONTRASTS:
        if rule not in prompt_steps or baseline not in prompt_steps:
            continue
        c = e1b_contrast(prompt_steps, rule, baseline, start, 0.95)
        c["family"] = family
        contrasts[f"{rule}-{baseline}"] = c
        cells = [
            f"{study.fmt_ci(c['mean']['ci'], 2, sign=True)} ({c['mean']['call']})",
            f"{study.fmt_ci(c['slope']['ci'], 2, sign=True)} ({c['slope']['call']})",
        ]
        cells += [study.fmt_ci(t, 2, sign=True) for t in c["thirds"]]  # fmt: skip
        lines.append(f"| {labels[rule]} - {labels[baseline]} | {family} | {c['pairs']} | " + " | ".join(cells) + " |")
    vs_clip = {k.split("-")[0]: v for k, v in contrasts.items() if k.endswith("-clip")}
    summary = {"start_p": start, "start_spread": spread, "thirds": ranges, "rules": rules,
               "contrasts": contrasts, "contrasts_vs_clip": vs_clip}  # fmt: skip
    return summary, "\n".join(lines)
