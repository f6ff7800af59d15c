"""XLA compiler options of the library's training programs, and the rule that picks them.

The rule, in one place (:func:`selected`, :func:`compiler_options`):

* **By CPU.** Where the CPU has AVX-512 the default set is ``ynn-reduce``: YNNPACK
  for reductions only (``xla_cpu_experimental_ynn_fusion_type =
  LIBRARY_FUSION_TYPE_REDUCE``), so convolutions run on XLA's own kernels, which made
  CNN train steps 1.2-1.4x faster on the AVX-512 EPYC of ``experiments/bench/RESULTS.md``.
  Elsewhere (AVX2 and older, ARM, anything not measured) it is ``xla``: XLA's own
  defaults, no option passed.
* **Override** with ``$PICPQ_XLA_CPU_OPTIONS`` (``xla`` or ``ynn-reduce``).
* **Checked on this machine.** A set other than ``xla`` is used only where
  :func:`gradient_error` on this machine is at most :data:`GRADIENT_TOLERANCE`; else
  one warning names the error and the CPU, and XLA's defaults compile the program.
  The check (a few seconds) runs once per machine, CPU flags and jaxlib; its result
  is kept in ``$PICPQ_CACHE`` (default ``~/.cache/picpq_jax``).

Measured (``python -m experiments.bench --workloads accuracy``, RESULTS.md,
"Compile options and gradient accuracy"): the smooth ResNet-8's train-mode gradient
is within 2-3e-6 of float64 with either set on the AVX-512 EPYC and on an AVX2 one
(Zen 2, emulated with ``qemu-x86_64 -cpu EPYC-Rome``); with no YNNPACK fusion at all
it is 3-4e-5 (XLA's own reductions), with bf16 products 2.5e-2. The "2.4% off"
that had been blamed on option sets, first with YNNPACK off on AVX-512 and then with
``ynn-reduce`` on AVX2, was a ReLU kink: one float32 ulp moves ResNet-8's float64
gradient by as much (``python -m experiments.bench.relu_kinks``), which is why the
check uses a smooth network.

The library's train step, evolution (fine-tuning candidates), HRank and federated
training programs are jitted with :func:`compiler_options`; evaluation programs and
other backends get none.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.errors import UserError

ENV = "PICPQ_XLA_CPU_OPTIONS"
OPTION_SETS: dict[str, dict[str, str]] = {
    "xla": {},  # XLA:CPU's defaults: YNNPACK fusions as XLA chooses
    "ynn-reduce": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
}
# Largest gradient_error() an option set may reach: both sets measured 2-3e-6, XLA's
# own reductions 3-4e-5, bf16 products 2.5e-2.
GRADIENT_TOLERANCE = 2e-5
CHECK_FILE = "xla_options_check.json"  # under $PICPQ_CACHE

# /proc/cpuinfo flag -> the name benchmark tables print, widest last.
VECTOR_EXTENSIONS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512-BF16",
                     "amx_tile": "AMX"}


def vector_extensions(cpuinfo: str | None = None) -> list[str]:
  """The CPU's vector extensions among :data:`VECTOR_EXTENSIONS`, e.g.
  ``["AVX2", "AVX-512", "AVX-512-BF16"]``; ``[]`` where /proc/cpuinfo is unreadable.

  Args:
    cpuinfo: the text of /proc/cpuinfo (read from the file when ``None``).
  """
  if cpuinfo is None:
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      return []
  flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                if line.startswith("flags")), [])
  return [name for flag, name in VECTOR_EXTENSIONS.items() if flag in flags]


NATIVE_BF16 = ("AVX-512-BF16", "AMX")  # extensions with bf16 dot products in hardware


@functools.cache
def warn_if_bf16_emulated() -> bool:
  """Warns once, and returns ``True``, where bf16 products would run on a CPU with
  none of :data:`NATIVE_BF16` (XLA then converts to float32 around every product,
  so ``dtype="bfloat16"`` may be slower than float32 there; its speed-up was
  measured on an AVX-512-BF16 CPU only)."""
  if jax.default_backend() != "cpu" or set(NATIVE_BF16) & set(vector_extensions()):
    return False
  warnings.warn("bfloat16 products are emulated on this CPU (no AVX-512-BF16 or AMX): "
                "expect no speed-up over float32; time both with `python -m "
                "experiments.bench --workloads step --jax-variants jax.jit+bf16`",
                RuntimeWarning, stacklevel=3)
  return True


def default_set(extensions: list[str]) -> str:
  """The option set for a CPU with ``extensions`` (see the module docstring)."""
  return "ynn-reduce" if "AVX-512" in extensions else "xla"


def selected() -> str:
  """The option set named by ``$PICPQ_XLA_CPU_OPTIONS``, else :func:`default_set` of
  this CPU."""
  name = os.environ.get(ENV) or default_set(vector_extensions())
  if name not in OPTION_SETS:
    raise UserError(f"{ENV}={name!r} is not an option set: use one of "
                    f"{', '.join(OPTION_SETS)} (or unset it for this CPU's default)")
  return name


@functools.cache
def _cpu_accepts(items: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib compiles with ``items`` (an option may be renamed or
  dropped in another XLA version; then the program compiles with the defaults)."""
  try:
    jax.jit(jnp.negative, compiler_options=dict(items)).lower(jnp.zeros(1)).compile()
  except Exception:  # XLA reports an unknown option or value as a runtime error
    return False
  return True


class SmoothResNet8(nn.Module):
  """ResNet-8's convolutions, batch norms and head with ``tanh`` for ReLU:
  ``[N, 32, 32, 3] -> [N, 10]``.

  Why not ResNet-8 itself: a ReLU network's gradient jumps where a pre-activation
  crosses zero, and among its ~10^6 pre-activations some lie within float32 rounding
  of zero, so rounding alone flips a kink. Measured on ResNet-8 at batch 32: moving
  its float64 inputs and parameters by one float32 ulp (relative 6e-8) moved the
  float64 gradient by 2.4e-2 (the "2.4% off" that had been blamed on option sets),
  by 5e-7 for other draws. A smooth network's gradient moves by rounding-sized
  amounts, so its float64 distance measures the compiled kernels, not luck.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    from picpq_jax.models.layers import QConv, QDense, batch_norm

    def conv_bn(x, features, name, stride=1, kernel=3):
      x = QConv(features, kernel_size=(kernel, kernel), strides=(stride, stride),
                dtype=self.dtype, name=f"{name}_conv")(x)
      return batch_norm(train, f"{name}_bn")(x)

    x = jnp.tanh(conv_bn(x, 16, "stem"))
    for stage, (features, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
      y = jnp.tanh(conv_bn(x, features, f"s{stage}a", stride))
      y = conv_bn(y, features, f"s{stage}b")
      if stride != 1:
        x = conv_bn(x, features, f"s{stage}down", stride, kernel=1)
      x = jnp.tanh(y + x)
    return QDense(10, dtype=self.dtype, name="head")(jnp.mean(x, axis=(1, 2)))


def gradient_error(options: dict[str, str] | None, model: nn.Module | None = None,
                   batch: int = 32) -> float:
  """Worst relative error of a model's train-mode gradient compiled with ``options``
  against the same model computed entirely in float64.

  Args:
    options: ``compiler_options`` of the float32 program (``None``: XLA's defaults).
    model: a module ``[N, 32, 32, 3] -> [N, classes]`` with a ``dtype`` field and
      batch norm (``train=True``); default :class:`SmoothResNet8`. Its float64 twin is
      ``model.clone(dtype=float64)``.
    batch: images in the random batch (seed 0).

  Returns:
    ``max |g - g64| / max |g64|`` per parameter leaf, the largest over leaves, for the
    gradient of the mean cross-entropy at the initial parameters (seed 0). A few
    seconds for the default model (two compilations).
  """
  from picpq_jax.train.steps import cross_entropy  # the loss's module imports this one

  model = SmoothResNet8() if model is None else model
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(functools.partial(model.init, train=True))(jax.random.key(0), x[:1])
  y = rng.integers(0, 10, batch).astype(np.int32)

  def grad(model):
    def loss(params, x):
      logits, _ = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
      return jnp.mean(cross_entropy(logits, y))
    return jax.grad(loss)

  got = jax.jit(grad(model), compiler_options=options)(variables["params"], x)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
    want = jax.jit(grad(model.clone(dtype=jnp.float64)))(p64, jnp.asarray(x, jnp.float64))
    want = jax.tree.map(np.asarray, want)
  return max(float(np.max(np.abs(np.asarray(g, np.float64) - w)) / np.max(np.abs(w)))
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def _check_key(name: str) -> str:
  """What a cached check result holds for: option set, jaxlib, CPU model and flags."""
  from importlib import metadata
  try:
    cpuinfo = Path("/proc/cpuinfo").read_text()
  except OSError:
    cpuinfo = ""
  first = cpuinfo.split("\n\n", 1)[0]
  cpu = [line for line in first.splitlines() if line.startswith(("model name", "flags"))]
  digest = hashlib.sha256("\n".join(cpu).encode()).hexdigest()[:16]
  return f"{name}|jaxlib {metadata.version('jaxlib')}|cpu {digest}"


@functools.cache
def accurate_here(name: str) -> bool:
  """Whether option set ``name`` passes :func:`gradient_error` on this machine.

  Runs the check once per machine (see :func:`_check_key`), keeps the error in
  ``$PICPQ_CACHE/xla_options_check.json``, and warns once per process when it fails.
  """
  from picpq_jax.data.image_folder import default_cache_dir
  path, key = default_cache_dir() / CHECK_FILE, _check_key(name)
  try:
    cache = json.loads(path.read_text())
  except (OSError, ValueError):
    cache = {}
  error = cache.get(key)
  if not isinstance(error, float):
    error = cache[key] = gradient_error(OPTION_SETS[name])
    try:  # a read-only cache only costs the check next time
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(f".{os.getpid()}.tmp")
      tmp.write_text(json.dumps(cache, indent=1))
      os.replace(tmp, path)
    except OSError:
      pass
  if error <= GRADIENT_TOLERANCE:
    return True
  cpu = ", ".join(vector_extensions()) or "unknown vector extensions"
  warnings.warn(f"XLA option set {name!r}: gradients {error:.1e} off float64 on this CPU "
                f"({cpu}), tolerance {GRADIENT_TOLERANCE:.0e}; compiling with XLA's "
                f"defaults instead (set {ENV}=xla to skip the check)",
                RuntimeWarning, stacklevel=3)
  return False


def compiler_options() -> dict[str, str] | None:
  """``compiler_options`` for ``jax.jit``: the :func:`selected` set when the default
  backend is CPU, this XLA accepts it and it passed :func:`accurate_here`; else
  ``None`` (XLA's defaults)."""
  name = selected()
  if jax.default_backend() != "cpu" or not OPTION_SETS[name]:
    return None
  items = tuple(sorted(OPTION_SETS[name].items()))
  if not _cpu_accepts(items) or not accurate_here(name):
    return None
  return dict(items)


def jit(fun: Callable, **kwargs: Any) -> Callable:
  """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` (read at this call)."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
