"""XLA compiler options of the library's convolution-heavy programs.

XLA:CPU (jaxlib 0.10.2) hands convolutions, dots, elementwise ops and reductions
to YNNPACK fusions by default. In a CNN train step, XLA's own convolution kernels
win, so the library keeps YNNPACK for reductions only
(``xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_REDUCE``). Train step
at batch 128 on the 2-core development CPU, timed in one process: ResNet-56
(materialized conv inputs) 1.12 -> 0.97 s, VGG-16 1.44 -> 1.10 s, ResNet-20 0.50 ->
0.36 s (``experiments/bench/RESULTS.md``), MobileNetV2 10.4 -> 8.6 s. Timed alone, YNNPACK's forward and
input-gradient convolutions are the faster ones and XLA's weight gradients; in the
step XLA's win (why was not traced).

Inference alone is faster with XLA's defaults (ResNet-56 forward at batch 128: 0.21
vs 0.23 s), so evaluation programs do not use these options; the HRank program
(forwards and ranks) runs at the same speed either way.

Reductions stay with YNNPACK for accuracy: with no YNNPACK fusion at all, XLA's
own kernels gave ResNet-8 train-mode gradients 0.4-2.4% away from a float64
reference (batch 32-64), against 2-5e-6 with YNNPACK reductions
(``tests/test_compile_options.py``).

The library's train step, evolution (fine-tuning candidates), HRank and federated
training programs are jitted with :func:`compiler_options`; other backends get
none. Set ``CPU_OPTIONS = {}`` to compile with XLA's defaults.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

CPU_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_accepts(items: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib compiles with ``items`` (an option may be renamed or
  dropped in another XLA version; then the program compiles with the defaults)."""
  try:
    jax.jit(jnp.negative, compiler_options=dict(items)).lower(jnp.zeros(1)).compile()
  except Exception:  # XLA reports an unknown option or value as a runtime error
    return False
  return True


def compiler_options() -> dict[str, str] | None:
  """``compiler_options`` for ``jax.jit``: :data:`CPU_OPTIONS` when the default
  backend is CPU (and this XLA accepts them), else ``None``."""
  if jax.default_backend() != "cpu" or not CPU_OPTIONS:
    return None
  items = tuple(sorted(CPU_OPTIONS.items()))
  return dict(items) if _cpu_accepts(items) else None


def jit(fun: Callable, **kwargs: Any) -> Callable:
  """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` (read at this call)."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
