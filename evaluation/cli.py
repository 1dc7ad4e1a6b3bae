"""`metta eval`: MeTTA's quality on the labelled sample photos — classification, retrieval, uncertainty,
convergence — as JSON, markdown tables and PNG plots (see docs/quality.md for the figures it made).

Per-view embeddings are computed once per (policy config, S_max, seed, image set) and cached under
--cache-dir; every smaller S is a prefix of the same views. The heavy lifting is in the other modules of this package.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from evaluation import report, studies
from evaluation.data import QueryEdits, decode_file, load_samples, make_query
from evaluation.views import cached_per_view
from service.core.policies import CropFlipPolicy, MultiscalePolicy
from service.testing import SAMPLE_DIR

STUDIES = ("classification", "retrieval", "uncertainty", "convergence")
DEFAULT_DATA = SAMPLE_DIR  # $METTA_SAMPLES_DIR, else ../shared/data/imagenet-sample
log = logging.getLogger("metta.eval")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _ranges(text: str) -> tuple[tuple[float, float], ...]:
    """'0.08-1,0.25-1' → ((0.08, 1.0), (0.25, 1.0))."""
    pairs = []
    for part in text.split(","):
        low, high = part.split("-")
        pairs.append((float(low), float(high)))
    return tuple(pairs)


def add_eval_arguments(cmd: argparse.ArgumentParser) -> None:
    """`metta eval`'s arguments, on the parser the CLI made for it (service/cli.py, which holds its help line)."""
    cmd.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with labels.tsv and the photos")
    cmd.add_argument("--limit", type=int, default=None, help="only the first N photos (smoke runs)")
    cmd.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated subset of {','.join(STUDIES)}")
    cmd.add_argument("--out", type=Path, default=Path("docs/quality"), help="folder for JSON, tables and PNGs")
    cmd.add_argument("--cache-dir", default=".cache/metta-eval", help="per-view embedding cache ('' for none)")
    cmd.add_argument("--model", default="efficientnet_lite0")
    cmd.add_argument("--mode", default="auto", help="execution engine: auto|eager|torchscript|openvino")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--classify-samples", type=_ints, default=(2, 4, 10, 32))
    cmd.add_argument("--scale-ranges", type=_ranges, default=((0.08, 1.0), (0.25, 1.0), (0.5, 1.0), (0.7, 1.0)),
                     help="crop_flip area ranges to sweep, e.g. 0.08-1,0.25-1")
    cmd.add_argument("--default-scale", type=_ranges, default=((0.25, 1.0),),
                     help="the crop_flip range used by the other studies")
    cmd.add_argument("--sweep-samples", type=int, default=10, help="S_max for the non-default scale ranges")
    cmd.add_argument("--retrieval-samples", type=_ints, default=(1, 2, 3, 8))
    cmd.add_argument("--uncertainty-samples", type=_ints, default=(4, 10, 32))
    cmd.add_argument("--convergence-images", type=int, default=50)
    cmd.add_argument("--convergence-reference", type=int, default=128)
    cmd.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    cmd.add_argument("--query-crop-area", type=_ranges, default=((0.5, 0.8),),
                     help="area fraction kept by the retrieval queries' crop, e.g. 0.25-0.64 (harder)")
    cmd.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")


def eval_command(args: argparse.Namespace) -> None:
    from models import ModelOptions, create_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    chosen = [s for s in args.studies.split(",") if s]
    unknown = sorted(set(chosen) - set(STUDIES))
    if unknown:
        sys.exit(f"metta eval: unknown studies {unknown}; choose from {', '.join(STUDIES)}")
    if not (args.data / "labels.tsv").is_file():
        sys.exit(f"metta eval: no labels.tsv in {args.data}")
    config = studies.StudyConfig(
        seed=args.seed, classify_samples=args.classify_samples, default_scale=args.default_scale[0],
        scale_ranges=args.scale_ranges, sweep_samples=args.sweep_samples,
        retrieval_samples=args.retrieval_samples, uncertainty_samples=args.uncertainty_samples,
        convergence_images=args.convergence_images, convergence_reference=args.convergence_reference,
        bootstrap=args.bootstrap)
    model = create_model(args.model, ModelOptions(mode=args.mode))
    edits = QueryEdits(crop_area=args.query_crop_area[0])
    results = run_studies(model, load_samples(args.data, args.limit), chosen, config,
                          Path(args.cache_dir) if args.cache_dir else None, edits)
    results["command"] = "metta eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None
    args.out.mkdir(parents=True, exist_ok=True)
    per_query = results.get("retrieval", {}).pop("per_query_hits", None)
    report.write_json(args.out / "results.json", results)
    if per_query is not None:
        np.savez_compressed(args.out / "retrieval_hits.npz", **per_query)
    (args.out / "tables.md").write_text(tables_markdown(results))
    written = [] if args.no_plots else report.plot_all(results, args.out)
    print(f"results → {args.out / 'results.json'}, tables → {args.out / 'tables.md'}"
          + (f", plots → {', '.join(p.name for p in written)}" if written else ""))


def run_studies(model: Any, samples: list[Any], chosen: list[str], config: studies.StudyConfig,
                cache_dir: Path | None, edits: QueryEdits) -> dict[str, Any]:
    """Run the chosen studies; views are computed lazily, once, by the banks below."""
    ids = [s.path.name for s in samples]
    labels = np.array([s.label for s in samples])
    query_ids = [f"{name}|{edits!r}|seed={config.seed}" for name in ids]
    memo: dict[tuple[str, str, int], np.ndarray] = {}
    # The photos' main banks are computed once at the largest S any chosen study needs; smaller
    # requests are prefixes of it (same plan, same seed).
    floors = {repr(CropFlipPolicy(scale=config.default_scale)): max(
                  [*config.classify_samples] * ("classification" in chosen or "convergence" in chosen)
                  + [*config.uncertainty_samples] * ("uncertainty" in chosen)
                  + [*config.retrieval_samples] * ("retrieval" in chosen), default=1),
              repr(MultiscalePolicy()): max(
                  [*config.classify_samples] * ("classification" in chosen)
                  + [*config.retrieval_samples] * ("retrieval" in chosen), default=1)}

    def bank_for(kind: str, image_ids: list[str], load: Any, seed: int) -> studies.ViewBank:
        def bank(policy: Any, samples_max: int) -> np.ndarray:
            key = (kind, repr(policy), seed)
            wanted = max(samples_max, floors.get(repr(policy), 1) if kind == "photos" else 1)
            if key not in memo or memo[key].shape[1] < samples_max:
                memo[key] = cached_per_view(model, image_ids, load, policy, wanted, seed, cache_dir)
            return memo[key][:, :samples_max]
        return bank

    photos = bank_for("photos", ids, lambda i: decode_file(samples[i].path), config.seed)
    queries = bank_for("queries", query_ids, lambda i: make_query(samples[i].path, i, config.seed, edits),
                       config.seed)
    size = model.spec.preprocess.input_size
    head = model.head
    weight = head.weight.detach().float().numpy() if head is not None else None
    bias = head.bias.detach().float().numpy() if head is not None else None
    results: dict[str, Any] = {"model": model.name, "fingerprint": model.fingerprint, "mode": model.mode,
                               "images": len(samples), "seed": config.seed, "query_edits": repr(edits)}
    timings = {}
    for name in chosen:
        started = time.perf_counter()
        if name == "classification":
            if weight is None or bias is None:
                log.warning("model %s has no classifier head: classification skipped", model.name)
                continue
            results[name] = studies.classification(photos, labels, weight, bias, config, size)
        elif name == "retrieval":
            results[name] = studies.retrieval(photos, queries, config, size)
            results[name]["dispersion"] = studies.retrieval_uncertainty(
                photos, queries, results[name]["per_query_hits"], config)
        elif name == "uncertainty":
            results[name] = studies.uncertainty(photos, labels, weight, bias, config)
        elif name == "convergence":
            reference = bank_for("reference", ids[: config.convergence_images],
                                 lambda i: decode_file(samples[i].path), config.seed + 1)
            results[name] = studies.convergence(photos, reference, config)
        timings[name] = round(time.perf_counter() - started, 1)
    results["seconds"] = timings
    return results


def tables_markdown(results: dict[str, Any]) -> str:
    parts = [f"# metta eval: {results['model']} ({results['mode']}), {results['images']} photos, "
             f"seed {results['seed']}\n"]
    if "classification" in results:
        parts += ["## Classification (paired vs center)\n", report.classification_table(results["classification"])]
    if "retrieval" in results:
        parts += [f"\n## Near-duplicate retrieval ({results['retrieval']['queries']} queries)\n",
                  report.retrieval_table(results["retrieval"])]
        if results["retrieval"].get("dispersion"):
            parts += ["\n### Query dispersion → nearest neighbour wrong (AUROC [95% CI])\n",
                      report.auroc_table(results["retrieval"]["dispersion"], "misses")]
    if "uncertainty" in results and results["uncertainty"]["rows"] and "auroc" in results["uncertainty"]["rows"][0]:
        parts += ["\n## Uncertainty → top-1 error (AUROC [95% CI])\n",
                  report.auroc_table(results["uncertainty"]["rows"], "errors")]
    if "convergence" in results:
        c = results["convergence"]
        parts += [f"\n## Convergence ({c['images']} photos, {c['policy']}, reference: {c['reference_views']} views"
                  f" of another seed)\n", report.convergence_table(c)]
    return "\n".join(parts) + "\n"
