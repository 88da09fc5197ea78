"""Model registry: maps names used on the command line to :class:`AnomalyModel` classes.

Every module in this package (except the private ones and ``base``) is imported on first
use, so adding a method is one new module whose class carries ``@register``.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

from ..errors import FlawscopeError
from .base import AnomalyModel

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[AnomalyModel]] = {}
#: Model modules that failed to import, with the reason: one broken module must not take
#: every other model (and a running service) down with it.
_BROKEN: dict[str, str] = {}
_discovered = False


def register(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    """Class decorator that makes a model available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two models registered as {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name != "base":
            try:
                importlib.import_module(f"{__name__}.{module.name}")
            except Exception as exc:  # noqa: BLE001 - reported, and named on every lookup
                _BROKEN[module.name] = f"{type(exc).__name__}: {exc}"
                log.error("model module %s failed to import: %s", module.name, exc)
    _discovered = True


def available_models() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[AnomalyModel]:
    _discover()
    if name not in _REGISTRY:
        broken = "".join(f"; module {m} failed to import ({why})" for m, why in _BROKEN.items())
        raise FlawscopeError(f"unknown model {name!r}; available: "
                             f"{', '.join(available_models())}{broken}")
    return _REGISTRY[name]


__all__ = ["AnomalyModel", "available_models", "get_model_class", "register"]
