"""The rules of a request's options, each written once: policy names, S per policy, the seed range.

Everything that checks an option (the library's `EmbedOptions`, the HTTP schemas, the settings, the
CLI) takes its names and bounds from here.
"""

from __future__ import annotations

from typing import Literal, get_args

PolicyName = Literal["center", "crop_flip", "multiscale", "ten_crop"]
POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)
ONE_VIEW_POLICIES = frozenset({"center"})  # policies that make exactly one view: S is always 1
MOST_VIEWS = {"ten_crop": 10}  # policies with a fixed list of distinct views: S at most this
MAX_SEED = 2**53 - 1  # seeds are exact in a JSON number (a double)
AUTO_SAMPLES_MIN = 2  # `samples: "auto"` bounds when a request gives none (the defaults)
AUTO_SAMPLES_MAX = 32


class PolicyError(ValueError):
    """A policy cannot produce views as asked (bad S, bad parameters, unknown name)."""


def samples_for(policy: str, requested: int | None, default: int) -> int:
    """The S a request gets: `requested`, else `default`; a one-view policy always gets 1."""
    if policy in ONE_VIEW_POLICIES:
        if requested not in (None, 1):
            raise PolicyError(f"the {policy} policy makes exactly one view: samples must be 1 (or omitted)")
        return 1
    samples = default if requested is None else requested
    if samples < 1:
        raise PolicyError(f"samples must be at least 1, got {samples}")
    if samples > MOST_VIEWS.get(policy, samples):
        raise PolicyError(f"the {policy} policy makes at most {MOST_VIEWS[policy]} distinct views, not {samples}")
    return samples


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise PolicyError(f"seed must be in [0, 2^53-1], got {seed}")


def auto_samples_range(policy: str, samples_min: int, samples_max: int, max_samples: int) -> tuple[int, int]:
    """The S range an auto request may get: samples_max capped by the server's max_samples and by the policy's
    distinct views; a one-view policy always gets (1, 1)."""
    if policy in ONE_VIEW_POLICIES:
        return 1, 1
    if samples_min > samples_max:
        raise PolicyError(f"samples_min ({samples_min}) is above samples_max ({samples_max})")
    if samples_min > max_samples:
        raise PolicyError(f"samples_min ({samples_min}) is above the server's max_samples ({max_samples})")
    most = MOST_VIEWS.get(policy, samples_max)
    if samples_min > most:
        raise PolicyError(f"samples_min ({samples_min}) is above the {most} distinct views of the {policy} policy")
    return samples_min, min(samples_max, max_samples, most)
