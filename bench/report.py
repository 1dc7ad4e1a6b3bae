"""results.json → tables.md (medians over repeats, ratios, goal checks) and the PNG plots.

    python -m bench.report docs/benchmarks/results.json
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

PEERS = ("naive", "litserve_eager", "litserve_ours")
PEER_GOAL = {"naive": 2.0, "litserve_eager": 1.2, "litserve_ours": 0.95}


def medians(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """(target, S, c) → median of every numeric field over the repeats (and the repeat count)."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["target"], row["samples"], row["concurrency"])].append(row)
    out = {}
    for key, group in groups.items():
        for r in group:
            # A loop slower than the window (a round of C requests takes longer than it) completes too few
            # replies inside it: there, throughput comes from Little's law over every reply of the run,
            # C × S / mean latency (exact for a closed loop in steady state), and the row is marked.
            if r["requests"] < r["concurrency"] and r.get("all_count") and r["all_mean_ms"] > 0:
                r["little"] = True
                r["crops_per_s"] = r["concurrency"] * r["samples"] / (r["all_mean_ms"] / 1000)
                r["images_per_s"] = r["crops_per_s"] / r["samples"]
                r["p50_ms"] = r["p95_ms"] = r["p99_ms"] = r["all_mean_ms"]  # only the mean is known
        merged: dict[str, Any] = {"n": len(group), "crops_all": [r["crops_per_s"] for r in group],
                                  "little": any(r.get("little") for r in group)}
        for field in ("crops_per_s", "images_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "client_cpu",
                      "server_cpu", "idle_servers_cpu", "loadavg_1m", "errors", "all_mean_ms"):
            merged[field] = statistics.median(r[field] for r in group)
        if "prom" in group[0]:
            for field in ("mean_ms", "p50_ms", "p95_ms"):
                merged[f"prom_{field}"] = statistics.median(r["prom"][field] for r in group)
            merged["prom_p50_bucket_ms"] = group[0]["prom"]["p50_bucket_ms"]
            merged["mean_batch_crops"] = statistics.median(r["prom"]["mean_batch_crops"] for r in group)
            stages: defaultdict[str, float] = defaultdict(float)
            for r in group:
                for stage, v in r["prom"]["stages"].items():
                    stages[stage] += v["sum_s"]
            merged["stage_sums_s"] = dict(stages)
        out[key] = merged
    return out


def _f(x: float, digits: int = 0) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_report(results: dict[str, Any], out: Path) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"Run {results.get('started')} · {results.get('cpu_model')} · {results.get('cpus')} CPUs · model "
        f"{results.get('model')} · threads {results.get('threads')} · load average (1/5/15 min) at start "
        f"{results.get('loadavg_start')}, at end {results.get('loadavg_end')} · "
        f"{_f(results.get('elapsed_s', 0) / 60, 1)} min{' · QUICK' if results.get('quick') else ''}"
        f"{' · SYNTHETIC photos (sample photos absent)' if results.get('photos') == 'synthetic' else ''}\n")
    raw = results.get("raw")
    r = {}
    if raw:
        r = {dtype: best["crops_per_s"] for dtype, best in raw["R"].items()}
        add("### R: forward alone on random input (crops/s, median per call)\n")
        batches = sorted({row["batch"] for row in raw["rows"] if "batch" in row})
        add("| engine | dtype | " + " | ".join(f"b={b}" for b in batches) + " |")
        add("|---|---|" + "---|" * len(batches))
        table: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
        for row in raw["rows"]:
            if "crops_per_s" in row:
                table[(row["engine"], row["dtype"])][row["batch"]] = row["crops_per_s"]
            else:
                table[(row["engine"], row["dtype"])] = {}
        for (engine, dtype), values in table.items():
            add(f"| {engine} | {dtype} | " + " | ".join(_f(values.get(b, math.nan)) for b in batches) + " |")
        add("")
        for dtype, best in raw["R"].items():
            add(f"- **R[{dtype}] = {best['crops_per_s']:.0f} crops/s** ({best['engine']}, batch {best['batch']})")
        stages = raw.get("stages")
        f32 = raw.get("forward32_s", {}).get("float32")
        if stages and f32:
            pre = stages["decode_s"] + stages["plan_shrink_s"] + stages["render_s"]
            add(f"- S=32, per image: decode {1000 * stages['decode_s']:.1f} ms + plan/downscale "
                f"{1000 * stages['plan_shrink_s']:.1f} ms + render 32 views {1000 * stages['render_s']:.1f} ms = "
                f"{1000 * pre:.1f} ms vs the best forward of 32 crops {1000 * f32:.1f} ms → "
                f"**{100 * pre / f32:.1f} %** (goal ≤ 10 %)")
        add("")
    grid = medians(results.get("grid", []))
    if grid:
        add("### metta-serve, closed loop (medians of the repeats)\n")
        add("| dtype | S | clients | crops/s | images/s | p50 ms | p95 ms | p99 ms | × R | server cores | "
            "client cores | mean batch | Prom mean / loadgen mean (all replies) ms | "
            "Prom p50 (bucket) / loadgen p50 ms | load |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (target, s, c), m in sorted(grid.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            if not target.startswith("metta"):
                continue
            dtype = "bfloat16" if target.endswith("bf16") else "float32"
            bucket = m.get("prom_p50_bucket_ms", [math.nan, math.nan])
            add(f"| {dtype} | {s} | {c} | {_f(m['crops_per_s'])} | {_f(m['images_per_s'], 1)} | {_f(m['p50_ms'])} | "
                f"{_f(m['p95_ms'])} | {_f(m['p99_ms'])} | "
                f"{_f(m['crops_per_s'] / r[dtype], 2) if dtype in r else '–'} | "
                f"{_f(m['server_cpu'], 2)} | {_f(m['client_cpu'], 2)} | {_f(m.get('mean_batch_crops', math.nan), 1)} | "
                f"{_f(m.get('prom_mean_ms', math.nan))} / {_f(m['all_mean_ms'])} | "
                f"{_f(m.get('prom_p50_ms', math.nan))} ({_f(bucket[0])}–{_f(bucket[1])}) / {_f(m['p50_ms'])} | "
                f"{_f(m['loadavg_1m'], 1)} |")
        add("")
        add("### Side by side with the peers (crops/s and p95 ms, medians; ratio = metta-serve / peer)\n")
        add("| S | clients | metta-serve | naive | LitServe eager | LitServe + our model | × naive | × LS-eager | "
            "× LS-ours | p95 better or equal? |")
        add("|---|---|---|---|---|---|---|---|---|---|")
        for (target, s, c), m in sorted(grid.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if target != "metta" or not any((p, s, c) in grid for p in PEERS):
                continue
            cells, ratios, p95_ok = [], [], []
            for peer in PEERS:
                p = grid.get((peer, s, c))
                if p is None:
                    cells.append("–")
                    ratios.append("–")
                    continue
                cells.append(f"{_f(p['crops_per_s'], 1)}{'†' if p['little'] else ''} / {_f(p['p95_ms'])}")
                ratio = m["crops_per_s"] / p["crops_per_s"] if p["crops_per_s"] else math.inf
                ok = "✓" if ratio >= PEER_GOAL[peer] else "✗"
                ratios.append(f"{ratio:.2f} {ok}")
                p95_ok.append(m["p95_ms"] <= p["p95_ms"])
            add(f"| {s} | {c} | {_f(m['crops_per_s'], 1)} / {_f(m['p95_ms'])} | " + " | ".join(cells) + " | "
                + " | ".join(ratios) + f" | {'yes' if all(p95_ok) else 'no'} |")
        add("")
        if any(m["little"] for m in grid.values()):
            add("† fewer replies than clients inside the window (a round took longer than the window): crops/s "
                "is C·S / mean latency over every reply of the run (Little's law), and the latency shown is "
                "that mean, not a percentile.\n")
        add(_goals(results, grid, r))
    sweep = results.get("sweep")
    if sweep:
        add("### Batching sweep (one server per setting; crops/s and p50/p95 ms)\n")
        add("| max_batch_crops | chunk_crops | max_wait_ms | S=1 c=16 | S=8 c=16 | S=32 c=16 | S=32 c=1 p50 ms "
            "| load |")
        add("|---|---|---|---|---|---|---|---|")
        configs: dict[tuple[int, int, float], dict[tuple[int, int], dict[str, Any]]] = defaultdict(dict)
        for row in sweep:
            knobs = (row["max_batch_crops"], row["chunk_crops"], row["max_wait_ms"])
            configs[knobs][(row["samples"], row["concurrency"])] = row
        for knobs, points in configs.items():
            cells = [f"{_f(points[p]['crops_per_s'])} ({_f(points[p]['p50_ms'])}/{_f(points[p]['p95_ms'])})"
                     if p in points else "–" for p in ((1, 16), (8, 16), (32, 16))]
            low = points.get((32, 1))
            load = statistics.median(p["loadavg_1m"] for p in points.values())
            add(f"| {knobs[0]} | {knobs[1]} | {knobs[2]:g} | " + " | ".join(cells)
                + f" | {_f(low['p50_ms']) if low else '–'} | {load:.1f} |")
        add("")
    soak = results.get("soak")
    if soak:
        rss = soak["rss"]
        load = soak["load"]
        add(f"### Soak: S=32, 16 clients, {load['seconds']:.0f} s\n")
        if rss:
            mib = [b / 2**20 for _, b in rss]
            half = len(mib) // 2
            add(f"- RSS start {mib[0]:.0f} MiB, end {mib[-1]:.0f} MiB, max {max(mib):.0f} MiB; median of the first "
                f"half {statistics.median(mib[:half] or mib):.0f} MiB vs second half "
                f"{statistics.median(mib[half:]):.0f} MiB "
                f"({len(mib)} samples every 5 s)")
        add(f"- {load['crops_per_s']:.0f} crops/s, p50 {load['p50_ms']:.0f} ms, p95 {load['p95_ms']:.0f} ms, "
            f"errors {load['errors']}, load average {load['loadavg_1m']:.1f}")
        stages = load.get("prom", {}).get("stages", {})
        if stages and stages.get("forward", {}).get("sum_s"):
            fwd = stages["forward"]["sum_s"]
            add("- the service's own stage histograms over the soak (seconds summed; share of forward): "
                + ", ".join(f"{k} {v['sum_s']:.1f} s ({100 * v['sum_s'] / fwd:.1f} %)" for k, v in stages.items()))
        prof = soak.get("profile", {})
        if prof.get("share"):
            add(f"- py-spy, 20 s, {int(prof['samples'])} samples of active threads: "
                + ", ".join(f"{k} {100 * v:.1f} %" for k, v in prof["share"].items()))
        elif prof:
            add(f"- py-spy: {prof.get('error')}")
        add("")
    text = "\n".join(lines)
    (out / "tables.md").write_text(text + "\n")
    try:
        _plots(results, grid, out)
    except ImportError as exc:
        print(f"plots skipped: {exc}", file=sys.stderr)
    print(text)
    return text


def _goals(results: dict[str, Any], grid: dict[tuple[str, int, int], dict[str, Any]], r: dict[str, float]) -> str:
    rows = ["### Goals\n", "| goal | measured | met? |", "|---|---|---|"]

    def check(name: str, value: float, target: float, text: str) -> None:
        if not math.isnan(value):
            rows.append(f"| {name} | {text} | {'yes' if value >= target else '**no**'} |")

    def crops(target: str, s: int, c: int) -> float:
        return grid[(target, s, c)]["crops_per_s"] if (target, s, c) in grid else math.nan

    for dtype, target, s, goal in (("float32", "metta", 32, 0.85), ("float32", "metta", 8, 0.75),
                                   ("float32", "metta", 1, 0.40), ("bfloat16", "metta_bf16", 32, 0.75)):
        if dtype in r:
            ratio = crops(target, s, 16) / r[dtype]
            check(f"{dtype} S={s}, 16 clients ≥ {goal} R", ratio, goal,
                  f"{crops(target, s, 16):.0f} / {r[dtype]:.0f} = {ratio:.2f} R")
    raw = results.get("raw") or {}
    f32 = (raw.get("forward32_s") or {}).get("float32")
    if f32 and ("metta", 32, 1) in grid:
        p50 = grid[("metta", 32, 1)]["p50_ms"] / 1000
        rows.append(f"| p50 at S=32, 1 client ≤ 1.2 × forward(32 crops) | {1000 * p50:.0f} ms vs "
                    f"{1000 * f32:.0f} ms = {p50 / f32:.2f}× | {'yes' if p50 <= 1.2 * f32 else '**no**'} |")
    return "\n".join(rows) + "\n"


def _plots(results: dict[str, Any], grid: dict[tuple[str, int, int], dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = results.get("raw")
    if raw:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, dtype in zip(axes, ("float32", "bfloat16"), strict=True):
            for engine in ("eager", "eager_cl", "torchscript", "openvino"):
                pts = sorted((row["batch"], row["crops_per_s"]) for row in raw["rows"]
                             if row["engine"] == engine and row["dtype"] == dtype and "crops_per_s" in row)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=engine)
            ax.set_xscale("log", base=2)
            ax.set_title(f"R grid, {dtype}, {raw['threads']} threads")
            ax.set_xlabel("batch (crops)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("crops/s (forward alone)")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "raw_limit.png", dpi=110)
        plt.close(fig)
    ours = {k: v for k, v in grid.items() if k[0] == "metta"}
    if ours:
        fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
        for c, color in ((1, "tab:blue"), (4, "tab:green"), (16, "tab:red")):
            pts = sorted((s, m) for (t, s, cc), m in ours.items() if cc == c)
            if not pts:
                continue
            xs = [s for s, _ in pts]
            lat.plot(xs, [m["p50_ms"] for _, m in pts], "-o", color=color, label=f"p50 loadgen, {c} clients")
            lat.plot(xs, [m["p95_ms"] for _, m in pts], "--", color=color, alpha=0.6, label=f"p95 loadgen, {c} clients")
            prom = [(s, m) for s, m in pts if not math.isnan(m.get("prom_p50_ms", math.nan))]
            if prom:
                # whiskers: the histogram bucket holding the p50 (the resolution of the read-back)
                lows = [max(0.0, m["prom_p50_ms"] - m["prom_p50_bucket_ms"][0]) for _, m in prom]
                highs = [max(0.0, m["prom_p50_bucket_ms"][1] - m["prom_p50_ms"])
                         if math.isfinite(m["prom_p50_bucket_ms"][1]) else 0.0 for _, m in prom]
                lat.errorbar([s for s, _ in prom], [m["prom_p50_ms"] for _, m in prom], yerr=[lows, highs], fmt="s",
                             color=color, mfc="none", capsize=3, label=f"p50 from /metrics histogram, {c} clients")
                lat.plot([s for s, _ in prom], [m["prom_mean_ms"] for _, m in prom], "x", color=color, ms=9,
                         label=f"mean from /metrics (sum/count), {c} clients")
            thr.plot(xs, [m["crops_per_s"] for _, m in pts], "-o", color=color, label=f"{c} clients")
        r = (raw or {}).get("R", {}).get("float32", {}).get("crops_per_s")
        if r:
            thr.axhline(r, color="k", ls=":", label=f"R fp32 = {r:.0f}")
        for ax in (lat, thr):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("S (views per image)")
            ax.grid(alpha=0.3)
        lat.set_yscale("log")
        lat.set_ylabel("latency (ms)")
        lat.set_title("metta-serve latency vs S (fp32)")
        lat.legend(fontsize=6)
        thr.set_ylim(bottom=0)
        thr.set_ylabel("crops/s")
        thr.set_title("throughput vs S")
        thr.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "latency_vs_S.png", dpi=110)
        plt.close(fig)
    points = sorted({(s, c) for (t, s, c) in grid if t in PEERS})
    if points:
        fig, ax = plt.subplots(figsize=(11, 4))
        names = ("metta", *PEERS)
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ys = [grid[(name, s, c)]["crops_per_s"] if (name, s, c) in grid else 0 for s, c in points]
            ax.bar([j + i * width for j in range(len(points))], ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(points))], [f"S={s}, c={c}" for s, c in points])
        ax.set_ylabel("crops/s (median)")
        ax.set_yscale("log")
        ax.set_title("metta-serve vs peers, same machine, same run")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "peers.png", dpi=110)
        plt.close(fig)
    soak = results.get("soak")
    if soak and soak.get("rss"):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([t for t, _ in soak["rss"]], [b / 2**20 for _, b in soak["rss"]], "-o", ms=3)
        ax.set_xlabel("seconds under load (S=32, 16 clients)")
        ax.set_ylabel("RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "soak_rss.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks/results.json")
    write_report(json.loads(path.read_text()), path.parent)
