"""Search spaces written in YAML, turned into Ray Tune sampling objects.

A space maps a dotted training-config key to one sampler::

    search_space:
      train.lr: {loguniform: [2.0e-4, 1.25e-3]}
      tasks.depth.crop_size: {choice: [[480, 352], [480, 480], [480, 640]]}

Each trial's config is then ``{key: sampled value}``, applied to the training config as
``key=value`` overrides, so the space can name any config field and needs no code change.
"""

from __future__ import annotations

from typing import Any

# ray.tune sampler name -> how many arguments it takes (1: one list of values)
SAMPLERS = {
    "loguniform": 2,
    "uniform": 2,
    "randint": 2,
    "qloguniform": 3,
    "quniform": 3,
    "choice": 1,
    "grid_search": 1,
}


def _sampler(key: str, spec: Any):
    from ray import tune

    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ValueError(f"search_space.{key}: expected one of {{{', '.join(SAMPLERS)}: ...}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in SAMPLERS:
        raise ValueError(f"search_space.{key}: unknown sampler {kind!r}; known: {', '.join(SAMPLERS)}")
    if SAMPLERS[kind] == 1:
        if not isinstance(args, (list, tuple)) or not args:
            raise ValueError(f"search_space.{key}.{kind}: expected a non-empty list of values, got {args!r}")
        return getattr(tune, kind)(list(args))
    if not isinstance(args, (list, tuple)) or len(args) != SAMPLERS[kind]:
        raise ValueError(f"search_space.{key}.{kind}: expected {SAMPLERS[kind]} numbers, got {args!r}")
    if kind in ("loguniform", "qloguniform") and min(args[:2]) <= 0:
        raise ValueError(f"search_space.{key}.{kind}: bounds must be positive, got {args!r}")
    return getattr(tune, kind)(*args)


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain lists/dicts (Tune and YAML both want plain values)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def build_param_space(search_space: dict[str, Any]) -> dict[str, Any]:
    """``{dotted key: {sampler: args}}`` -> Tune ``param_space`` with the same keys."""
    if not search_space:
        raise ValueError("search_space is empty: name at least one config key to sweep")
    return {key: _sampler(key, to_plain(spec)) for key, spec in to_plain(search_space).items()}


def format_override(key: str, value: Any) -> str:
    """A sampled value as a ``key=value`` override the config loader parses back to the same value."""
    if isinstance(value, (list, tuple)):
        return f"{key}=[{','.join(str(v) for v in value)}]"
    return f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
