"""A label-free uncertainty score for one image, from its mean embedding alone (no classifier head).

`label_free_uncertainty` = ‖m‖₁ / ‖m‖₂ of the mean embedding m over the views: the participation
ratio of its activations, between 1 (one feature carries everything) and √dim (all equal). A pooled
embedding that spreads its mass over many features belongs to a photo the backbone has no sharp
pattern for; a few strong features mean a confident match. It is scale-free (unchanged by
`normalize`), defined for any S, and costs one pass over the mean. Among 19 head-free scores (from the views,
their mean and the pre-pooling feature map; `python -m evaluation.label_free`, docs/quality.md §5) it is level
with the best: AUROC for /v1/classify's errors 0.754 / 0.616 on the two halves of the sample photos (0.68 on
all), far below the head's max probability (0.88).
"""

from __future__ import annotations

import numpy as np


def label_free_uncertainty(mean: np.ndarray) -> np.ndarray | float:
    """‖m‖₁ / ‖m‖₂ over the last axis (higher = less certain); 0 for an all-zero mean."""
    m = np.asarray(mean, dtype=np.float64)
    ratio = np.abs(m).sum(axis=-1) / np.maximum(np.linalg.norm(m, axis=-1), 1e-300)
    return float(ratio) if ratio.ndim == 0 else ratio
