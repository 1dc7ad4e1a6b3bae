"""Results → JSON, markdown tables and PNG plots (matplotlib, imported only when plotting)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_json(path: Path, data: dict[str, Any]) -> None:
    def plain(value: Any) -> Any:  # numpy scalars and arrays → JSON types
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"not JSON-serialisable: {type(value)}")

    path.write_text(json.dumps(data, indent=1, default=plain) + "\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def classification_table(result: dict[str, Any]) -> str:
    lines = ["| policy | method | S | forwards | pixels (224² views) | top-1 % | Δ top-1 (+/−, McNemar p) "
             "| top-5 % | NLL | Δ NLL [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        vs = row.get("vs_center")
        d_top1 = d_nll = "—"
        if vs:
            m, n = vs["top1"], vs["nll"]
            gain = row["top1"] - result["rows"][0]["top1"]
            d_top1 = f"{100 * gain:+.1f} (+{m['b_only']}/−{m['a_only']}, p={_p(m['p'])})"
            d_nll = f"{n['diff']:+.3f} [{n['lo']:+.3f}, {n['hi']:+.3f}]"
        lines.append(f"| {row['policy']} | {row['method']} | {row['S']} | {row['forwards']} | {row['pixels']:.2f} "
                     f"| {_pct(row['top1'])} | {d_top1} | {_pct(row['top5'])} | {row['nll']:.3f} | {d_nll} |")
    return "\n".join(lines)


def retrieval_table(result: dict[str, Any]) -> str:
    lines = ["| policy | S | per-view L2 | forwards | pixels (224² views) | recall@1 | Δ recall@1 [95% CI] (+/−, p) "
             "| mAP | Δ mAP [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        vs = row.get("vs_center")
        d_r = d_m = "—"
        if vs:
            c, m, b = vs["recall_at_1_ci"], vs["recall_at_1"], vs["map"]
            d_r = (f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] "
                   f"(+{m['b_only']}/−{m['a_only']}, p={_p(m['p'])})")
            d_m = f"{b['diff']:+.3f} [{b['lo']:+.3f}, {b['hi']:+.3f}]"
        lines.append(f"| {row['policy']} | {row['S']} | {'yes' if row['view_normalize'] else 'no'} "
                     f"| {row['forwards']} | {row['pixels']:.2f} | {row['recall_at_1']:.3f} | {d_r} "
                     f"| {row['map']:.3f} | {d_m} |")
    return "\n".join(lines)


def auroc_table(rows: list[dict[str, Any]], label: str) -> str:
    names = list(rows[0]["auroc"]) if rows and "auroc" in rows[0] else []
    lines = ["| score | " + " | ".join(f"{r['policy']} S={r['S']} ({r[label]} {label})" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for name in names:
        cells = [f"{r['auroc'][name]['auroc']:.3f} [{r['auroc'][name]['lo']:.2f}, {r['auroc'][name]['hi']:.2f}]"
                 for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def convergence_table(result: dict[str, Any]) -> str:
    lines = ["| S | median cos | 5th percentile cos |", "|---|---|---|"]
    lines += [f"| {r['S']} | {r['median']:.4f} | {r['p5']:.4f} |" for r in result["rows"]]
    c = result["center"]
    lines.append(f"| central crop | {c['median']:.4f} | {c['p5']:.4f} |")
    return "\n".join(lines)


def plot_all(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per figure; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "classification" in results:
        cls = results["classification"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        center = cls["rows"][0]
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in cls["rows"][1:]:
            groups.setdefault((row["policy"], row["method"]), []).append(row)
        for (policy, method), rows in groups.items():
            style = "-o" if method == "metta" else ":x"
            for ax, key in zip(axes, ("top1", "nll"), strict=True):
                ax.plot([r["S"] for r in rows], [r[key] for r in rows], style, label=f"{policy} {method}")
        for ax, key, title in zip(axes, ("top1", "nll"), ("top-1 accuracy", "NLL"), strict=True):
            ax.axhline(center[key], color="k", lw=1, ls="--", label="center (S=1)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("views S")
            ax.set_title(title)
        axes[1].legend(fontsize=7)
        save(fig, "classification_vs_S.png")

        interp = cls.get("interpolation")
        if interp:
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for ax, key in zip(axes, ("nll", "top1"), strict=True):
                ax.plot(interp["alphas"], interp["center"][key], "-o", label="y = central crop")
                ax.plot(interp["alphas"], interp["single_views"][key], "-s", label="y = single views")
                ax.axvline(0, color="grey", lw=0.8)
                ax.axvline(1, color="grey", lw=0.8, ls=":")
                ax.set_xlabel("α  (0 = mean embedding, 1 = y)")
                ax.set_title(f"{'NLL' if key == 'nll' else 'top-1'} along (1-α)·mean + α·y")
            axes[0].legend()
            save(fig, "interpolation.png")

    if "retrieval" in results:
        rows = results["retrieval"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        lines: dict[tuple[str, bool], list[dict[str, Any]]] = {}
        for row in rows:
            family = row["policy"].split("(")[0] if row["policy"].startswith("multiscale") else row["policy"]
            if row["policy"].startswith("multiscale(√2"):
                family = "multiscale(√2,…)"
            lines.setdefault((family, row["view_normalize"]), []).append(row)
        for (family, vn), group in lines.items():
            if family == "center":
                ax.axhline(group[0]["recall_at_1"], color="k", ls="--", lw=1, label="center")
                continue
            ax.plot([r["pixels"] for r in group], [r["recall_at_1"] for r in group], "-o" if vn else "-s",
                    label=f"{family}{' per-view L2' if vn else ''}")
        ax.set_xlabel("pixels forwarded (224² views)")
        ax.set_ylabel("recall@1")
        ax.legend(fontsize=7)
        save(fig, "retrieval.png")

    if "convergence" in results:
        conv = results["convergence"]
        fig, ax = plt.subplots(figsize=(6, 4))
        sizes = [r["S"] for r in conv["rows"]]
        ax.plot(sizes, [r["median"] for r in conv["rows"]], "-o", label="median")
        ax.plot(sizes, [r["p5"] for r in conv["rows"]], "-s", label="5th percentile")
        ax.axhline(conv["center"]["median"], color="k", ls="--", lw=1, label="central crop (median)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("views S")
        ax.set_ylabel(f"cos(S-view mean, {conv['reference_views']}-view mean)")
        ax.legend()
        save(fig, "convergence.png")
    return written
