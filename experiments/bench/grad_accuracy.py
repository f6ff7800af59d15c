"""Workload 8: how far each JAX variant's train-mode gradient is from float64.

For ``jax.jit`` (the library's XLA options) and every ``--jax-variants`` name, the
gradient of :class:`picpq_jax.compile_options.SmoothResNet8` (ResNet-8's layers with
tanh for ReLU, batch statistics, mean cross-entropy) on a random batch of
``accuracy_batch`` images, compiled as the variant compiles (option set, ``+bf16``
products), against the same network computed in float64:
:func:`picpq_jax.compile_options.gradient_error`, the largest over parameter leaves
of ``max |g - g64| / max |g64|``. A smooth network because a ReLU network's
gradient jumps where float32 rounding flips a kink (see ``SmoothResNet8``), so its
distance to float64 measures luck, not kernels.

The result records the CPU's vector extensions (``environment``): the same
variant's error may differ between CPUs (AVX2, AVX-512), which is the point.
"""

from __future__ import annotations

import time

from experiments.bench import common, setups, variants


def run(cfg) -> dict:
  """Gradient error and check time of ``jax.jit`` and ``cfg.jax_variants``."""
  from picpq_jax import compile_options
  load_start = common.loadavg()
  rows = []
  for name in ["jax.jit", *cfg.jax_variants]:
    dtype = "bfloat16" if variants.BF16_SUFFIX in name else "float32"
    options = setups.compiler_options(variants.option_set(name))
    start = time.perf_counter()
    error = compile_options.gradient_error(
        options, compile_options.SmoothResNet8(dtype=dtype), batch=cfg.accuracy_batch)
    rows.append({"model": "smooth_resnet8", "batch": cfg.accuracy_batch, "variant": name,
                 "dtype": dtype, "options": options or {}, "gradient_error": error,
                 "seconds": time.perf_counter() - start})
    print(f"gradient error {name}: {error:.2e}", flush=True)
  return common.result("grad_accuracy", {"batch": cfg.accuracy_batch,
                                         "variants": ["jax.jit", *cfg.jax_variants]},
                       rows, load_start)


def table(res: dict) -> str:
  """Markdown table: variant, dtype, options and the gradient error against float64."""
  lines = [[r["variant"], r["dtype"],
            ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "XLA's defaults",
            f"{r['gradient_error']:.1e}"] for r in res["rows"]]
  return common.markdown_table(
      f"Train-mode gradient against float64, smooth ResNet-8, batch {res['config']['batch']}",
      ["variant", "products", "XLA options", "worst relative error"], lines)
