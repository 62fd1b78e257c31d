"""Task registry.

A task is everything that differs between depth, segmentation and referring segmentation:
its options (a dataclass), its head, the cross-attention context it feeds the backbone, its
augmentation, its loss, its test-time protocol and its metrics. The trainer, the backbone and
the entry points only ever talk to the :class:`~vpd_ray.tasks.base.Task` interface, looked up by
name here, so multitask training is a list of task names and nothing branches on them.

Tasks register themselves with :func:`register_task`; the built-in modules are imported lazily
on the first lookup so that ``import vpd_ray.tasks`` costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vpd_ray.tasks.base import Task

_REGISTRY: dict[str, type["Task"]] = {}
_BUILTIN_MODULES = ("vpd_ray.tasks.depth", "vpd_ray.tasks.seg", "vpd_ray.tasks.refer")
_builtins_loaded = False


def register_task(cls: type["Task"]) -> type["Task"]:
    """Class decorator: make ``cls`` available as ``get_task(cls.name)``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice ({_REGISTRY[cls.name]} and {cls})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_task(name: str) -> type["Task"]:
    """The task class registered as ``name``; a KeyError naming the known tasks otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY)) or 'none'}") from None
