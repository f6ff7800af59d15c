"""Named JAX train-step variants the step-time benchmark can compare.

``"jax.jit"`` is the library's plain :func:`picpq_jax.train.steps.train_step`;
other names select performance switches of the train step. Each has
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


def train_step_fn(name: str) -> Callable:
  """The train step named ``name`` (a key of :data:`VARIANTS`)."""
  try:
    return VARIANTS[name]
  except KeyError:
    raise ValueError(f"unknown JAX step variant {name!r}: choose from {sorted(VARIANTS)}") from None
