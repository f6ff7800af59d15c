"""Named JAX train-step variants the step-time benchmark can compare.

``"jax.jit"`` is the library's plain :func:`picpq_jax.train.steps.train_step`,
compiled with the library's XLA options (:mod:`picpq_jax.compile_options`); other
names select performance switches of the train step, and a ``+ynn`` suffix compiles
with XLA:CPU's defaults instead (YNNPACK fusions on). Each step has
``train_step``'s signature ``(state, images, labels, *, model, tx)``. A ``+bf16``
suffix (before ``+ynn``) runs the model with ``dtype="bfloat16"``: conv and dense
products in bfloat16 with float32 accumulation, everything else float32.
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
BF16_SUFFIX = "+bf16"


def names() -> list[str]:
  """Every variant name: each of :data:`VARIANTS`, with and without ``+bf16`` and
  ``+ynn``."""
  return [n + bf16 + ynn for n in VARIANTS for bf16 in ("", BF16_SUFFIX)
          for ynn in ("", XLA_DEFAULTS_SUFFIX)]


def train_step_fn(name: str) -> Callable:
  """The train step of variant ``name`` (see :func:`names`)."""
  base = name.removesuffix(XLA_DEFAULTS_SUFFIX).removesuffix(BF16_SUFFIX)
  if base not in VARIANTS:
    raise ValueError(f"unknown JAX step variant {name!r}: choose from {names()}")
  return VARIANTS[base]


def xla_defaults(name: str) -> bool:
  """Whether variant ``name`` compiles with XLA's default options."""
  return name.endswith(XLA_DEFAULTS_SUFFIX)


def model_for(name: str, model):
  """The model variant ``name`` trains: ``model`` itself, or with ``+bf16`` a copy
  with ``dtype="bfloat16"`` (same parameters)."""
  if BF16_SUFFIX in name:
    return model.clone(dtype="bfloat16")
  return model
