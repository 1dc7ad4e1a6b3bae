"""The model registry: names → factories. It registers and looks up; it never compiles.

A factory returns a `BuiltBackbone`: an eval-mode module mapping a normalised float batch
(B, 3, H, W) to the global pooled pre-logits embedding (B, dim), with its spec. The families
(`models.efficientnet`, `models.zoo`, `models.dummy`, `models.sleep`) register themselves when
`models` is imported; this module imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable

from models.spec import BuiltBackbone, ModelError, ModelOptions

Factory = Callable[[ModelOptions], BuiltBackbone]
PrefixFactory = Callable[[str, ModelOptions], BuiltBackbone]
_REGISTRY: dict[str, Factory] = {}
_PREFIXES: dict[str, PrefixFactory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Register a factory under `name`. Names are unique: registering one twice is a bug."""

    def wrap(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ModelError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def register_prefix(prefix: str) -> Callable[[PrefixFactory], PrefixFactory]:
    """Register a family addressed as `prefix:<architecture>` (e.g. `timm:resnet50`)."""

    def wrap(factory: PrefixFactory) -> PrefixFactory:
        if prefix in _PREFIXES:
            raise ModelError(f"model prefix {prefix!r} is registered twice")
        _PREFIXES[prefix] = factory
        return factory

    return wrap


def available_models() -> list[str]:
    """The registered names, and each family as `prefix:<name>`."""
    return sorted(_REGISTRY) + [f"{prefix}:<name>" for prefix in sorted(_PREFIXES)]


def build_backbone(name: str, options: ModelOptions | None = None) -> BuiltBackbone:
    """The backbone registered as `name` (or `prefix:arch`), built but not compiled for any engine."""
    options = options or ModelOptions()
    prefix, _, arch = name.partition(":")
    if name in _REGISTRY:
        return _REGISTRY[name](options)
    if arch and prefix in _PREFIXES:
        return _PREFIXES[prefix](arch, options)
    families = ", ".join(f"'{p}:<name>'" for p in sorted(_PREFIXES))
    raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}; "
                     f"or any architecture of {families}")
