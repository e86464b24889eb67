"""The tables and plot of ``bench_active.py`` runs: mean and standard error per budget, the area under mAP vs
labels, and the labels each strategy needs to reach random's mAP at the last budget (bootstrap over seeds)."""

from __future__ import annotations

import statistics

import numpy as np

def curve(rows: list[dict], strategy: str, budgets: list[int], seeds: list[int], metric: str) -> np.ndarray:
    """seeds x budgets of ``metric``."""
    table = {(r["seed"], r["labeled"]): r[metric] for r in rows if r["strategy"] == strategy}
    return np.array([[table[(s, b)] for b in budgets] for s in seeds])


def _trapezoid(y, x, axis=-1):
    return (np.trapezoid if hasattr(np, "trapezoid") else np.trapz)(y, x, axis=axis)


def labels_to_reach(mean: np.ndarray, budgets: list[int], target: float) -> float:
    """The labels at which the (linearly interpolated) mean curve first reaches ``target``; inf if never."""
    if mean[0] >= target:
        return float(budgets[0])
    for j in range(1, len(budgets)):
        if mean[j] >= target:
            lo, hi = mean[j - 1], mean[j]
            return budgets[j - 1] + (budgets[j] - budgets[j - 1]) * (target - lo) / max(hi - lo, 1e-9)
    return float("inf")


def finished_seeds(rows: list[dict], budgets: list[int], strategies: list[str]) -> list[int]:
    """The seeds that reached the last budget with every strategy."""
    done = {(r["seed"], r["strategy"]) for r in rows if r["labeled"] == budgets[-1]}
    return sorted({seed for seed, _ in done if all((seed, s) in done for s in strategies)})


def report(rows: list[dict], budgets: list[int], strategies: list[str], metric: str = "map50",
           boot: int = 2000) -> str:
    seeds = finished_seeds(rows, budgets, strategies)
    if not seeds:
        return "no seed finished every strategy"
    curves = {s: curve(rows, s, budgets, seeds, metric) for s in strategies}
    n = len(seeds)
    lines = [f"{metric}, {n} seed(s) {seeds}: mean ± standard error", "",
             "| labeled | " + " | ".join(strategies) + " |", "|---:|" + "---:|" * len(strategies)]
    for j, b in enumerate(budgets):
        cells = []
        for s in strategies:
            v = curves[s][:, j]
            se = statistics.stdev(v) / n ** 0.5 if n > 1 else 0.0
            cells.append(f"{v.mean():.3f} ± {se:.3f}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    span = budgets[-1] - budgets[0]
    auc = {s: float(_trapezoid(curves[s].mean(0), budgets) / span) for s in strategies}
    lines += ["", "| strategy | area under mAP vs labels (mean mAP) | vs random, paired (± SE) | "
              f"labels to reach random's mAP at {budgets[-1]} [95% bootstrap] |", "|---|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    target = curves["random"][:, -1].mean() if "random" in curves else None
    for s in strategies:
        per_seed = _trapezoid(curves[s], budgets, axis=1) / span
        diff = per_seed - _trapezoid(curves["random"], budgets, axis=1) / span if "random" in curves else per_seed * 0
        se = statistics.stdev(diff) / n ** 0.5 if n > 1 else 0.0
        reach = labels_to_reach(curves[s].mean(0), budgets, target) if target is not None else float("nan")
        draws = []
        for _ in range(boot if n > 1 and "random" in curves else 0):
            idx = rng.integers(n, size=n)
            draws.append(labels_to_reach(curves[s][idx].mean(0), budgets, curves["random"][idx, -1].mean()))
        interval = (f"[{_fmt(np.quantile(draws, 0.025, method='inverted_cdf'), budgets)}, "
                    f"{_fmt(np.quantile(draws, 0.975, method='inverted_cdf'), budgets)}]" if draws else "")  # inf: never
        if target is None:  # no random in these runs: nothing to compare with (merge one with --report)
            lines.append(f"| {s} | {auc[s]:.3f} | - | - |")
            continue
        lines.append(f"| {s} | {auc[s]:.3f} | {diff.mean():+.3f} ± {se:.3f} | {_fmt(reach, budgets)} {interval} |")
    return "\n".join(lines)


LABELS = {"random": "random", "uncertainty": "uncertainty (least_confidence)",
          "clusters": "uncertainty + clusters", "typical": "typical first, then uncertainty + clusters"}


def plot(rows: list[dict], budgets: list[int], strategies: list[str], path: str, title: str,
         metric: str = "map50") -> None:
    """mAP vs labels per strategy: the mean over seeds with a band of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = finished_seeds(rows, budgets, strategies)
    if not seeds:
        raise SystemExit("--plot: no seed finished every strategy")
    fig, ax = plt.subplots(figsize=(7, 4))
    for strategy in strategies:
        c = curve(rows, strategy, budgets, seeds, metric)
        mean, se = c.mean(0), (c.std(0, ddof=1) / len(seeds) ** 0.5 if len(seeds) > 1 else 0 * c.mean(0))
        style = "--" if strategy == "random" else "-"
        ax.plot(budgets, mean, style, marker="o", label=LABELS.get(strategy, strategy),
                color="gray" if strategy == "random" else None)
        ax.fill_between(budgets, mean - se, mean + se, alpha=0.15, color="gray" if strategy == "random" else None)
    ax.set(xlabel="labeled images", ylabel="test " + ("mAP@0.5" if metric == "map50" else "mAP@[.5:.95]"),
           title=f"{title} ({len(seeds)} seeds, mean ± SE)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: float, budgets: list[int]) -> str:
    if not np.isfinite(value):
        return f"> {budgets[-1]}"
    return f"<= {budgets[0]}" if value <= budgets[0] else f"{value:.1f}"


