"""Classification with mean embeddings (eq. 7): softmax(θᵀ mean / T) with the model's own head.

The head is linear, so applying it to the mean of the S views is one small matrix product per
image, done on the CPU after the engine returns the means. T is the shipped temperature
(`models.calibration`); the reported probabilities, maximum and entropy are of the calibrated
distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models import LoadedModel
from models.imagenet_labels import labels_for


@dataclass(frozen=True)
class Head:
    """A classifier head as float64 arrays, with its class names when known."""

    weight: np.ndarray  # (classes, dim)
    bias: np.ndarray  # (classes,)
    labels: tuple[str, ...] | None

    @property
    def classes(self) -> int:
        return int(self.weight.shape[0])


def head_of(model: LoadedModel) -> Head | None:
    """The model's head, or None for a backbone without one (then it cannot classify)."""
    if model.head is None:
        return None
    weight = model.head.weight.detach().to("cpu", dtype=torch.float64).numpy()
    bias = model.head.bias.detach().to("cpu", dtype=torch.float64).numpy() if model.head.bias is not None \
        else np.zeros(weight.shape[0])
    return Head(weight, bias, labels_for(weight.shape[0]))


@dataclass(frozen=True)
class Prediction:
    classes: list[int]  # the top-k class indices, most probable first
    probabilities: list[float]  # their calibrated probabilities
    max_probability: float
    entropy: float  # nats, of the whole calibrated distribution


def predict(head: Head, means: np.ndarray, temperature: float, top_k: int) -> list[Prediction]:
    """Calibrated top-k for each row of `means` (N, dim)."""
    logits = (np.asarray(means, dtype=np.float64) @ head.weight.T + head.bias) / temperature
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    probs = np.exp(log_probs)
    entropy = -(probs * log_probs).sum(axis=1)
    k = min(top_k, head.classes)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [Prediction([int(c) for c in row], [float(probs[i, c]) for c in row], float(probs[i, row[0]]),
                       float(max(entropy[i], 0.0)))
            for i, row in enumerate(top)]
