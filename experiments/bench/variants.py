"""Named JAX train-step variants the step-time benchmark can compare.

``"jax.jit"`` is the library's plain :func:`picpq_jax.train.steps.train_step`,
compiled with the library's XLA options (:mod:`picpq_jax.compile_options`: the
option set for this CPU); other names select performance switches of the train
step. A suffix names an option set of
:data:`~picpq_jax.compile_options.OPTION_SETS`, used without the library's accuracy
check: ``+xla`` XLA's defaults, ``+reduce`` ``ynn-reduce`` (YNNPACK for reductions
only, XLA's own convolutions). Each step has ``train_step``'s signature
``(state, images, labels, *, model, tx)``. A ``+bf16`` suffix (before the option
set's) runs the model with ``dtype="bfloat16"``: conv and dense products in bfloat16
with float32 accumulation, everything else float32.

Results saved before 2026-12-06 name a ``+ynn`` suffix: XLA's defaults, when the
library's own set was always ``ynn-reduce``.
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


OPTION_SUFFIXES = {"+xla": "xla", "+reduce": "ynn-reduce"}
BF16_SUFFIX = "+bf16"


def names() -> list[str]:
  """Every variant name: each of :data:`VARIANTS`, with and without ``+bf16`` and an
  option-set suffix."""
  return [n + bf16 + opt for n in VARIANTS for bf16 in ("", BF16_SUFFIX)
          for opt in ("", *OPTION_SUFFIXES)]


def _strip(name: str) -> str:
  for suffix in OPTION_SUFFIXES:
    name = name.removesuffix(suffix)
  return name.removesuffix(BF16_SUFFIX)


def train_step_fn(name: str) -> Callable:
  """The train step of variant ``name`` (see :func:`names`)."""
  base = _strip(name)
  if base not in VARIANTS:
    raise ValueError(f"unknown JAX step variant {name!r}: choose from {names()}")
  return VARIANTS[base]


def option_set(name: str) -> str | None:
  """The :data:`~picpq_jax.compile_options.OPTION_SETS` name variant ``name`` compiles
  with, by its suffix; ``None`` (the library's choice) without one."""
  return next((s for suffix, s in OPTION_SUFFIXES.items() if name.endswith(suffix)), None)


def model_for(name: str, model):
  """The model variant ``name`` trains: ``model`` itself, or with ``+bf16`` a copy
  with ``dtype="bfloat16"`` (same parameters)."""
  if BF16_SUFFIX in name:
    return model.clone(dtype="bfloat16")
  return model
