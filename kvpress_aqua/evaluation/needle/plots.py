"""PNG plots of needle results: depth x length heatmaps and score vs KV bytes.

matplotlib is an optional dependency (``pip install 'kvpress-aqua[plot]'``): it is imported only
when a plot is drawn, and its absence raises an ``ImportError`` that says how to install it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .results import summarize

__all__ = ["heatmap_grid", "plot_heatmaps", "plot_score_vs_bytes", "require_matplotlib", "safe_name"]

# red -> yellow -> green, the colours of the original needle-in-a-haystack heatmaps
_SCORE_COLOURS = ("#F0496E", "#EBB839", "#0CD79F")


def require_matplotlib() -> Any:
    """Import ``matplotlib.pyplot`` with the non-interactive Agg backend.

    Raises
    ------
    ImportError
        With the install command when matplotlib is missing.

    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install 'kvpress-aqua[plot]' (or pass --no-plots)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_name(text: str) -> str:
    """A file-name-safe version of a policy name (inline specs hold ``:``, ``=``, ``+``...)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "policy"


def _grid(rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[int], list[list[float | None]]]:
    """Depths (y), lengths (x) and the mean score of each (depth, length), ``None`` where no cell ran."""
    depths = sorted({float(r["depth"]) for r in rows})
    lengths = sorted({int(r["length"]) for r in rows})
    sums: dict[tuple[float, int], list[float]] = {}
    for r in rows:
        sums.setdefault((float(r["depth"]), int(r["length"])), []).append(float(r["score"]))
    values = [[(sum(v) / len(v)) if (v := sums.get((d, n))) else None for n in lengths] for d in depths]
    return depths, lengths, values


def _draw_heatmap(ax: Any, rows: Sequence[dict[str, Any]], title: str, annotate: bool = True) -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("needle", _SCORE_COLOURS).with_extremes(bad="#DDDDDD")
    depths, lengths, values = _grid(rows)
    data = [[float("nan") if v is None else v for v in line] for line in values]
    image = ax.imshow(data, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="upper", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (% of context)")
    ax.set_title(title, fontsize=10)
    if annotate and len(depths) * len(lengths) <= 120:
        for i, line in enumerate(values):
            for j, v in enumerate(line):
                if v is not None:
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=9, color="black")
    return image


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _title(policy: str, protocol: str, rows: Sequence[dict[str, Any]]) -> str:
    tasks = ", ".join(dict.fromkeys(r["task"] for r in rows))
    fraction = sum(float(r["kv_fraction"]) for r in rows) / len(rows)
    score = sum(float(r["score"]) for r in rows) / len(rows)
    return f"{policy} | {protocol}\n{tasks}\nKV {fraction:.0%} of dense | mean score {score:.2f}"


def plot_heatmaps(rows: Sequence[dict[str, Any]], out_dir: Path, model: str = "") -> list[Path]:
    """One PNG per policy: a depth x length heatmap of the mean score per protocol (tasks averaged).

    Parameters
    ----------
    rows : sequence of dict
        Result rows (:data:`~kvpress_aqua.evaluation.needle.results.RESULT_FIELDS`).
    out_dir : Path
        Folder for ``heatmap-<policy>.png``.
    model : str
        Shown in the figure title.

    Returns
    -------
    list of Path
        The files written.

    """
    plt = require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        protocols = list(dict.fromkeys(r["protocol"] for r in mine))
        fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols) + 1.2, 5.2), squeeze=False,
                                 constrained_layout=True)
        image = None
        for ax, protocol in zip(axes[0], protocols, strict=True):
            cells = [r for r in mine if r["protocol"] == protocol]
            image = _draw_heatmap(ax, cells, _title(policy, protocol, cells))
        fig.colorbar(image, ax=axes[0].tolist(), label="exact-match score", fraction=0.05)
        if model:
            fig.suptitle(f"Needle in a haystack: {model}", fontsize=11)
        path = out_dir / f"heatmap-{safe_name(policy)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def heatmap_grid(rows: Sequence[dict[str, Any]], path: Path, model: str = "") -> Path:
    """Every policy (rows) under every protocol (columns) as small heatmaps in one PNG.

    Parameters
    ----------
    rows : sequence of dict
        Result rows.
    path : Path
        The PNG to write.
    model : str
        Shown in the figure title.

    Returns
    -------
    Path

    """
    plt = require_matplotlib()
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    fig, axes = plt.subplots(len(policies), len(protocols), squeeze=False, constrained_layout=True,
                             figsize=(4.0 * len(protocols) + 1.0, 3.3 * len(policies)))
    image = None
    for i, policy in enumerate(policies):
        for j, protocol in enumerate(protocols):
            cells = [r for r in rows if r["policy"] == policy and r["protocol"] == protocol]
            ax = axes[i][j]
            if not cells:
                ax.set_axis_off()
                continue
            image = _draw_heatmap(ax, cells, _title(policy, protocol, cells), annotate=False)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="exact-match score", fraction=0.03)
    fig.suptitle(f"Needle in a haystack{': ' + model if model else ''}", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_score_vs_bytes(rows: Sequence[dict[str, Any]], path: Path, model: str = "") -> Path:
    """Mean score against the measured fraction of dense KV bytes, one point per (policy, protocol).

    Parameters
    ----------
    rows : sequence of dict
        Result rows.
    path : Path
        The PNG to write.
    model : str
        Shown in the title.

    Returns
    -------
    Path

    """
    plt = require_matplotlib()
    from matplotlib.lines import Line2D

    # a big circle under a small square: both stay visible where the protocols tie
    markers = {"query-aware": ("o", 150), "context-first": ("s", 45)}
    fig, ax = plt.subplots(figsize=(9.5, 5.2), layout="constrained")
    summary = summarize(rows)
    colours = plt.get_cmap("tab10")
    policies = list(dict.fromkeys(s.policy for s in summary))
    for s in summary:
        marker, size = markers.get(s.protocol, ("^", 70))
        ax.scatter(s.kv_fraction, s.score, marker=marker, s=size, zorder=3 if marker == "o" else 4,
                   color=colours(policies.index(s.policy) % 10), edgecolor="black", linewidth=0.5)
    by_policy = [Line2D([], [], linestyle="", marker="o", color=colours(i % 10), markeredgecolor="black", label=p)
                 for i, p in enumerate(policies)]
    by_protocol = [Line2D([], [], linestyle="", marker=m, color="grey", markeredgecolor="black", label=p)
                   for p, (m, _) in markers.items() if any(s.protocol == p for s in summary)]
    fig.legend(handles=by_policy, title="policy", loc="outside right upper", fontsize=8)
    fig.legend(handles=by_protocol, title="protocol", loc="outside right lower", fontsize=8)
    ax.set_xlabel("KV bytes held, fraction of dense (measured, metadata and AQUA matrices included)")
    ax.set_ylabel("mean exact-match score")
    ax.set_xlim(0, max(1.05, max(s.kv_fraction for s in summary) + 0.05))
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.set_title(f"Needle score vs KV memory{': ' + model if model else ''}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
