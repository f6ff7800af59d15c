"""Convolution algorithms chosen per shape, by measurement on the machine at hand.

XLA:CPU runs every convolution with one algorithm whose cost barely follows the
channel counts: a 3x3 conv on 128 maps of 32x32 takes about as long from 16 to 2
channels as from 16 to 16 (``experiments/bench/RESULTS.md``, issue 18), so a
compacted model whose pruned layers keep 2 or 7 channels saves MACs but no time.
Two other ways to compute the same stride-1 convolution are much faster at such
shapes, and slower at others:

* ``"input_taps"``: gather the ``kh * kw`` shifted input taps into
  ``[N, H', W', kh * kw * C_in]`` and multiply once by the flattened kernel
  (:func:`picpq_jax.models.layers.conv_taps_matmul`): good for few input channels;
* ``"output_taps"``: multiply the input once by all taps of the kernel,
  ``[N, H, W, C_in] @ [C_in, kh * kw * C_out]``, and add the ``kh * kw`` shifted
  slices of the product (:func:`conv_output_taps`): good for few output channels.

No rule of thumb picks between them reliably (a 16 -> 7 conv is 3x slower as
output taps, a 16 -> 4 one 2.6x faster), so :func:`tune` times every applicable
algorithm for each convolution shape a model runs, on random data of that shape,
and keeps the fastest when it beats XLA's by :data:`MIN_GAIN`. The choice is a
table ``{shape key: algorithm}`` that :func:`picpq_jax.models.layers.conv2d` reads
while tracing: :func:`use` installs one (as XLA's own autotuning caches do on GPU),
so tune first, then jit. All algorithms compute the same convolution to float
rounding and are differentiable; the timing is of the forward pass (inference).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ALGORITHMS = ("xla", "input_taps", "output_taps")

# An algorithm other than XLA's replaces it only when at least this much faster.
MIN_GAIN = 1.10

_TABLE: dict[str, str] = {}
_RECORDING: list[dict[str, Any]] | None = None


def shape_key(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
              padding: tuple[tuple[int, int], ...], dtype: Any) -> str:
  """The table key of a stride-1 dense NHWC/HWIO convolution: shapes, padding, dtype."""
  pad = ",".join(f"{a}:{b}" for a, b in padding)
  return (f"x{'x'.join(map(str, x_shape))}|k{'x'.join(map(str, kernel_shape))}|p{pad}|"
          f"{jnp.dtype(dtype).name}")


def conv_output_taps(x: Array, kernel: Array, padding: tuple[tuple[int, int], ...],
                     preferred_element_type: Any = None) -> Array:
  """Stride-1 dense convolution as one matmul onto all output taps, then shifted adds.

  Args:
    x: ``[N, H, W, C_in]``.
    kernel: ``[kh, kw, C_in, C_out]`` (HWIO).
    padding: ``((top, bottom), (left, right))``.

  Returns:
    ``[N, H', W', C_out]``, ``H' = H + top + bottom - kh + 1`` (likewise ``W'``),
    equal to ``lax.conv_general_dilated`` to float rounding:
    ``out[h, w] = sum_ij (x @ kernel[i, j])[h + i - top, w + j - left]``. The product
    ``[N, H, W, kh * kw * C_out]`` is ``kh * kw * C_out / C_in`` times the input's
    size: meant for few output channels.
  """
  kh, kw, c_in, c_out = kernel.shape
  (top, bottom), (left, right) = padding
  flat = kernel.transpose(2, 0, 1, 3).reshape(c_in, kh * kw * c_out)
  y = jnp.dot(x, flat, preferred_element_type=preferred_element_type)
  y = y.reshape(*x.shape[:3], kh, kw, c_out)
  y = jnp.pad(y, ((0, 0), (top, bottom), (left, right), (0, 0), (0, 0), (0, 0)))
  h_out, w_out = y.shape[1] - kh + 1, y.shape[2] - kw + 1
  return sum(y[:, i:i + h_out, j:j + w_out, i, j, :] for i in range(kh) for j in range(kw))


def choice(key: str) -> str:
  """The installed algorithm for ``key`` (``"xla"`` when none was tuned); records the
  key while :func:`tune` collects a model's convolutions."""
  if _RECORDING is not None:
    _RECORDING.append(key)
  return _TABLE.get(key, "xla")


def table() -> dict[str, str]:
  """A copy of the installed ``{shape key: algorithm}`` table."""
  return dict(_TABLE)


@contextlib.contextmanager
def use(chosen: Mapping[str, str]) -> Iterator[None]:
  """Installs ``chosen`` (merged over the current table) while tracing in the block.

  A function jitted inside the block keeps the algorithms of its first trace, so
  call (or ``.lower``) it inside.
  """
  unknown = set(chosen.values()) - set(ALGORITHMS)
  if unknown:
    raise ValueError(f"unknown convolution algorithms {sorted(unknown)}; use {ALGORITHMS}")
  saved = dict(_TABLE)
  _TABLE.update(chosen)
  try:
    yield
  finally:
    _TABLE.clear()
    _TABLE.update(saved)


def _keys_of(fn: Callable, *args: Any) -> list[str]:
  """The shape keys of the tunable convolutions ``fn(*args)`` runs, in order."""
  global _RECORDING
  _RECORDING, seen = [], None
  try:
    jax.eval_shape(lambda *a: fn(*a), *args)  # a new function: no cached trace
    seen = _RECORDING
  finally:
    _RECORDING = None
  return list(dict.fromkeys(seen))


def _parse(key: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...], Any]:
  """Inverse of :func:`shape_key`."""
  x, k, p, dtype = key.split("|")
  pads = tuple(tuple(int(v) for v in pair.split(":")) for pair in p[1:].split(","))
  return (tuple(int(v) for v in x[1:].split("x")), tuple(int(v) for v in k[1:].split("x")),
          pads, jnp.dtype(dtype))


def time_algorithms(key: str, reps: int = 5, compiler_options: dict | None = None
                    ) -> dict[str, float]:
  """Median forward seconds of each algorithm on random data of ``key``'s shapes.

  Each algorithm is timed in ``reps`` back-to-back calls after two warm-up calls,
  as its convolution runs inside a model's steady state. (Alternating the
  algorithms call by call was tried: their large temporaries then miss the
  allocator's and the caches' reuse and the timings stop predicting the model's;
  ``experiments/bench/RESULTS.md``, issue 18.)
  """
  from picpq_jax.models import layers  # pylint: disable=g-import-not-at-top
  x_shape, k_shape, padding, dtype = _parse(key)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  kernel = jnp.asarray(rng.standard_normal(k_shape), dtype)
  impls = {
      "xla": lambda x, k: jax.lax.conv_general_dilated(
          x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")),
      "input_taps": lambda x, k: layers.conv_taps_matmul(x, k, padding),
      "output_taps": lambda x, k: conv_output_taps(x, k, padding),
  }
  fns = {name: jax.jit(fn, compiler_options=compiler_options) for name, fn in impls.items()}
  medians = {}
  for name, fn in fns.items():
    times = []
    for call in range(reps + 2):
      start = time.perf_counter()
      jax.block_until_ready(fn(x, kernel))
      if call >= 2:
        times.append(time.perf_counter() - start)
    medians[name] = float(np.median(times))
  return medians


def tune(fn: Callable, *args: Any, reps: int = 5, compiler_options: dict | None = None,
         log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
  """Times every algorithm for each convolution shape ``fn(*args)`` runs.

  Args:
    fn: e.g. ``lambda v, x: model.apply(v, x)``; traced once (abstractly) to
      collect its convolutions' shapes.
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``), at the batch size
      that will run.
    reps: timed calls per algorithm and shape (medians).
    compiler_options: the ``jax.jit`` options the model will run with.
    log: called with one line per shape.

  Returns:
    ``{key: {"algorithm": name, "seconds": {name: median s}}}``; the chosen
    algorithm is the fastest if it beats ``"xla"`` by :data:`MIN_GAIN`, else
    ``"xla"``. Install the choices with ``use({k: r["algorithm"] ...})`` or
    :func:`chosen`.
  """
  results = {}
  for key in _keys_of(fn, *args):
    seconds = time_algorithms(key, reps, compiler_options)
    best = min(seconds, key=seconds.get)
    if seconds[best] * MIN_GAIN > seconds["xla"]:
      best = "xla"
    results[key] = {"algorithm": best, "seconds": seconds}
    if log:
      log(f"{key}: {best} ({', '.join(f'{n} {s * 1e3:.2f} ms' for n, s in seconds.items())})")
  return results


def chosen(results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
  """``{key: algorithm}`` of :func:`tune`'s results."""
  return {key: r["algorithm"] for key, r in results.items()}
