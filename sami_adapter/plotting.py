"""Every plot (matplotlib, drawn off-screen): information profiles, the mechanism figure, metric bars and
the rate study's metric-against-rate panels. Image grids are pictures, not plots: :mod:`sami_adapter.report`."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .evaluation import active_dimensions
from .extras import import_extra
from .report import aggregate, format_value


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    matplotlib = import_extra("matplotlib", "The plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    """Lay out ``fig``, write it as a PNG at ``path`` (folders created) and close it."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_axes(axes: Dict[str, Any], path: str, title: Optional[str] = None) -> str:
    """:func:`plot_information_profile` of a :func:`discover_axes` result, each dimension labelled with its
    best-matching factor and ``|corr|`` when the pass had factors."""
    alignment = axes.get("alignment")
    labels = None
    if alignment is not None:
        labels = [f"{alignment['best_factor'][i]} {alignment['best_score'][i]:.2f}" for i in range(len(alignment["best_factor"]))]
    return plot_information_profile(axes["profile"], path, axes["levels"], labels=labels, title=title)


def plot_information_profile(
    profile: Dict[str, Any],
    path: str,
    levels: Optional[Dict[str, Any]] = None,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> str:
    """Plot per-dimension information against noise level and save it as a PNG at ``path``.

    Left: ``I_i(t)`` in nats. Right: ``I_i(t) / I_i(0)`` with the ``fraction`` line and each
    dimension's characteristic noise level marked (when ``levels`` is given). Active dimensions
    (``levels["active"]``) are drawn solid, the others dotted grey. The top axis shows ``s_t``.

    Args:
        profile: output of :func:`information_profile`.
        path: PNG path (folders created).
        levels: output of :func:`characteristic_noise_levels`.
        labels: optional per-dimension legend suffixes (e.g. the best-matching factor).
        title: figure title.
    """
    plt = _pyplot()
    t = np.asarray(profile["timesteps"], dtype=np.float64)
    info = np.asarray(profile["information"], dtype=np.float64)
    sigma = np.asarray(profile["sigma"], dtype=np.float64)
    num_dims = info.shape[1]
    active = set(levels["active"]) if levels is not None else set(active_dimensions(np.asarray(profile["kl"])[0]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10" if num_dims <= 10 else "tab20")
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = info / info[0:1]
    for i in range(num_dims):
        name = f"z{i}" + (f" ({labels[i]})" if labels is not None else "")
        style = dict(color=colors(i % colors.N), lw=1.8) if i in active else dict(color="0.6", lw=1.0, ls=":")
        axes[0].plot(t, info[:, i], label=name if i in active else None, **style)
        if i in active:
            axes[1].plot(t, relative[:, i], label=name, **style)
            if levels is not None and np.isfinite(levels["timestep"][i]):
                axes[1].plot([levels["timestep"][i]], [levels["fraction"]], "o", color=style["color"], ms=6)
    axes[0].set_ylabel("information I_i(t) (nats, Gaussian capacity)")
    axes[1].set_ylabel("I_i(t) / I_i(0)")
    if levels is not None:
        axes[1].axhline(levels["fraction"], color="k", lw=0.8, ls="--")
    finite = relative[:, sorted(active)] if active else np.zeros(1)
    finite = finite[np.isfinite(finite)]
    axes[1].set_ylim(-0.05, float(np.clip(finite.max() * 1.05, 1.15, 2.0)) if finite.size else 1.15)
    for ax in axes:
        ax.set_xlabel("timestep t")
        ax.set_xlim(t[0], t[-1])
        ax.grid(alpha=0.3)
        order = np.argsort(sigma)
        top = ax.secondary_xaxis(
            "top", functions=(lambda x: np.interp(x, t, sigma), lambda s: np.interp(s, sigma[order], t[order]))
        )
        top.set_xlabel("noise scale s_t")
    if active:
        axes[1].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_mechanism(
    profile: Dict[str, Any], levels: Dict[str, Any], recoverability: Dict[str, Any], table: Dict[str, Any], path: str,
    title: Optional[str] = None,
) -> str:
    """SAMI's mechanism in one picture: each active dimension's relative information ``I_i(t) / I_i(0)``
    (solid) beside the probe R² of the factor it codes, relative to its clean value (dashed, same colour),
    with each dimension's characteristic noise level (dot) and each factor's noise scale (cross).

    Args:
        profile, levels: :func:`information_profile` and :func:`characteristic_noise_levels`.
        recoverability: :func:`factor_recoverability`.
        table: :func:`mechanism_table` (which dimension codes which factor).
        path: PNG path (folders created).
    """
    plt = _pyplot()
    t = np.asarray(profile["timesteps"], dtype=np.float64)
    info = np.asarray(profile["information"], dtype=np.float64)
    names = recoverability["names"]
    factor_color = {name: plt.get_cmap("tab10")(k) for k, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    styles = ["-", "-.", (0, (5, 1)), (0, (1, 1))]
    seen: Dict[str, int] = {}
    for row in table["rows"]:
        i, name = row["dim"], row["factor"]
        style = styles[seen.get(name, 0) % len(styles)]
        seen[name] = seen.get(name, 0) + 1
        with np.errstate(divide="ignore", invalid="ignore"):
            ax.plot(t, info[:, i] / info[0, i], ls=style, lw=1.8, color=factor_color[name], label=f"z{i} -> {name} ({row['rank_corr']:.2f})")
        if np.isfinite(row["t_star"]):
            ax.plot([row["t_star"]], [levels["fraction"]], "o", color=factor_color[name], ms=6)
    rt = np.asarray(recoverability["timesteps"], dtype=np.float64)
    r2 = np.asarray(recoverability["r2"], dtype=np.float64)
    scales = table.get("factor_noise_scales", {})
    for k, name in enumerate(names):
        ax.plot(rt, r2[:, k] / max(r2[0, k], 1e-12), ls="--", lw=1.2, color=factor_color[name], alpha=0.8, label=f"factor {name}: probe R²")
        if np.isfinite(scales.get(name, np.nan)):
            ax.plot([scales[name]], [levels["fraction"]], "x", color=factor_color[name], ms=9, mew=2)
    ax.axhline(levels["fraction"], color="k", lw=0.8, ls=":")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("share of the clean value")
    ax.set_xlim(t[0], t[-1])
    ax.set_ylim(-0.05, 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    rho = table.get("spearman", float("nan"))
    ax.set_title((title + "\n" if title else "") + f"dimension level (o) vs its factor's noise scale (x): Spearman {format_value(rho, '.2f')}", fontsize=9)
    return _save(fig, path)


def plot_metric_bars(columns: Dict[str, List[Dict[str, float]]], path: str, rows: List[str]) -> str:
    """Grouped bars (mean, std error bars over runs) of ``rows`` for each model; saved as PNG."""
    plt = _pyplot()
    stats = {name: aggregate(runs) for name, runs in columns.items()}
    x = np.arange(len(rows))
    width = 0.8 / max(len(stats), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.8))
    for j, (name, per_row) in enumerate(stats.items()):
        means = [per_row.get(r, {}).get("mean", np.nan) for r in rows]
        stds = [per_row.get(r, {}).get("std", 0.0) for r in rows]
        ax.bar(x + (j - (len(stats) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(rows, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


RATE_STUDY_PANELS = [("MIG", "MIG"), ("DCI disentanglement", "DCI disentanglement"), ("prior clean fraction", "prior samples: clean disks"),
                     ("reconstruction R² (x, y, radius mean)", "reconstruction R² x/y/radius"), ("guidance gain", "SAMI guidance gain")]


def plot_rate_study(table: List[Dict[str, Any]], path: str, title: str, panels: Sequence[tuple] = RATE_STUDY_PANELS) -> str:
    """Each metric against the rate, one line per method: the marker sits at the upper bound on I(x; z) and
    a horizontal bar reaches down to the lower bound (the mixture bound saturates at log N, so high-rate
    codes show a long bar); vertical bars are the seeds' std.

    Args:
        table: rows with ``method``, ``information_lower``, ``information_upper`` and each panel's key, each a ``{"mean", "std"}``
            dict or None (:func:`~sami_adapter.report.rate_study_table` builds them).
        path: PNG to write.
        title: figure title.
        panels: ``(key, label)`` pairs, one panel each; panels with no values are left out.
    """
    plt = _pyplot()
    panels = [(k, label) for k, label in panels if any(t[k] is not None for t in table)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.3), squeeze=False)
    methods = sorted({t["method"] for t in table})
    for ax, (key, label) in zip(axes[0], panels):
        for method in methods:
            pts = sorted((t for t in table if t["method"] == method and t[key] is not None), key=lambda t: t["information_upper"]["mean"])
            if not pts:
                continue
            upper = [t["information_upper"]["mean"] for t in pts]
            below = [max(0.0, u - t["information_lower"]["mean"]) for u, t in zip(upper, pts)]
            ax.errorbar(upper, [t[key]["mean"] for t in pts], xerr=[below, [0.0] * len(pts)], yerr=[t[key]["std"] for t in pts],
                        marker="o", ms=4, capsize=2, label=method)
        ax.set_xlabel("I(x; z), nats (upper bound; bar to lower)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_accuracy_curve(curves: Dict[str, Dict[int, float]], path: str, ylabel: str = "held-out linear-probe accuracy",
                        references: Optional[Dict[str, float]] = None) -> str:
    """One line per run: an accuracy (or any score) against training steps, with optional horizontal reference lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, curve in curves.items():
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], marker="o", label=name)
    for name, value in (references or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey")
        ax.annotate(name, (0, value), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    ax.set_xlabel("training steps")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _save(fig, path)
