"""Named JAX train-step variants the step-time benchmark can compare.

``"jax.jit"`` is the library's plain :func:`picpq_jax.train.steps.train_step`,
compiled with the library's XLA options (:mod:`picpq_jax.compile_options`); other
names select performance switches of the train step, and a ``+ynn`` suffix compiles
with XLA:CPU's defaults instead (YNNPACK fusions on). Each step has
``train_step``'s signature ``(state, images, labels, *, model, tx)``.
"""

from __future__ import annotations

import functools
from typing import Callable

from picpq_jax.train import steps

VARIANTS: dict[str, Callable] = {
    "jax.jit": steps.train_step,
    # conv inputs stored once (x @ I) instead of recomputed inside the backward transposes
    "jax.jit+materialized": functools.partial(steps.train_step, conv_inputs="materialized"),
}


XLA_DEFAULTS_SUFFIX = "+ynn"


def names() -> list[str]:
  """Every variant name: each of :data:`VARIANTS`, with and without ``+ynn``."""
  return [n + suffix for n in VARIANTS for suffix in ("", XLA_DEFAULTS_SUFFIX)]


def train_step_fn(name: str) -> Callable:
  """The train step of variant ``name`` (see :func:`names`)."""
  base = name.removesuffix(XLA_DEFAULTS_SUFFIX)
  if base not in VARIANTS:
    raise ValueError(f"unknown JAX step variant {name!r}: choose from {names()}")
  return VARIANTS[base]


def xla_defaults(name: str) -> bool:
  """Whether variant ``name`` compiles with XLA's default options."""
  return name.endswith(XLA_DEFAULTS_SUFFIX)
