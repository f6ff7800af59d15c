"""Workload 2: steady-state train step and inference time, JAX ``jit`` against
PyTorch eager and ``torch.compile``, with achieved GFLOP/s against this machine's
fp32 matmul peak measured in the same run.

For each model and batch size every variant is built (same weights, same batch,
NHWC for JAX, NCHW for PyTorch), warmed up (compilation happens there), then the
timed repetitions run round-robin across the variants, so that load from other
processes on this shared machine falls on all of them alike.

Variants (``kind/framework``): ``train/jax.jit`` (the library's train step,
state donated), ``train/torch.eager``, ``train/torch.compile`` (the whole step
compiled), and ``infer/...`` likewise (BN in inference mode, no autograd). Extra
JAX train-step variants (performance switches, ``experiments.bench.variants``) are
added with ``--jax-variants``; with ``jax.jit+xla`` or ``jax.jit+reduce`` among them,
inference is also timed with that option set (``infer/jax.jit+xla``, ...).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from experiments.bench import common, setups


def measure_round_robin(fns: dict[str, Callable[[], Any]], *, warmup: int,
                        reps: int) -> dict[str, dict]:
  """Warms every ``fns[name]`` up, then times ``reps`` rounds that call each once.

  Returns ``{name: summarize(times)}``.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: common.summarize(t) for name, t in times.items()}


def _jax_variants(cfg, model, variables, x, y) -> dict[str, Callable]:
  import jax
  import jax.numpy as jnp
  from experiments.bench import variants
  fns = {}
  xj = jnp.asarray(x)
  for name in ["jax.jit", *cfg.jax_variants]:
    step, state = setups.jax_train(variants.model_for(name, model), variables,
                                   variants.train_step_fn(name), variants.option_set(name))
    fns[f"train/{name}"] = setups.JaxStepper(step, state, x, y)
  for name in ["jax.jit", *(n for n in cfg.jax_variants if n in ("jax.jit+xla",
                                                                 "jax.jit+reduce"))]:
    infer = setups.jax_infer(model, variants.option_set(name))
    fns[f"infer/{name}"] = lambda infer=infer: jax.block_until_ready(infer(variables, xj))
  return fns


def _torch_variants(cfg, arch, variables, x, y) -> dict[str, Callable]:
  import torch
  xt, yt = setups.torch_nchw(x), torch.from_numpy(y.astype("int64"))
  fns = {}
  modes = [("torch.eager", False)] + ([("torch.compile", True)] if cfg.torch_compile else [])
  for name, compiled in modes:
    if compiled:
      torch._dynamo.reset()  # a fresh, static-shape compilation per model and batch
    backend = cfg.torch_compile_backend
    train = setups.torch_train(setups.torch_model(arch, variables), compiled, backend)
    infer = setups.torch_infer(setups.torch_model(arch, variables), compiled, backend)
    fns[f"train/{name}"] = lambda train=train: train(xt, yt)
    fns[f"infer/{name}"] = lambda infer=infer: infer(xt)
  return fns


def run(cfg) -> dict:
  """Step and inference times for ``cfg.step_models`` x ``cfg.batches``."""
  load_start = common.loadavg()
  peak = common.matmul_peak(cfg.matmul_size, warmup=cfg.warmup, reps=max(cfg.reps, 3),
                            use_torch=cfg.use_torch)
  print(f"fp32 matmul {cfg.matmul_size}^3: JAX {peak['jax_gflops']:.1f} GFLOP/s, "
        f"torch {peak['torch_gflops'] or 0:.1f} GFLOP/s", flush=True)
  rows = []
  for arch in cfg.step_models:
    model, variables, structure = setups.jax_model(arch)
    for batch in cfg.batches:
      x, y = setups.random_batch(batch)
      fns = _jax_variants(cfg, model, variables, x, y)
      if cfg.use_torch:
        fns.update(_torch_variants(cfg, arch, variables, x, y))
      # torch.compile needs two calls to compile (the optimizer step recompiles once)
      stats = measure_round_robin(fns, warmup=max(cfg.warmup, 2), reps=cfg.reps)
      for name, s in stats.items():
        kind, framework = name.split("/", 1)
        flops = (setups.train_flops if kind == "train" else setups.infer_flops)(structure, batch)
        gflops = flops / s["median_s"] / 1e9
        rows.append({"model": arch, "batch": batch, "kind": kind, "framework": framework,
                     **s, "gflop": flops / 1e9, "gflops_per_s": gflops,
                     "fraction_of_peak": gflops / peak["peak_gflops"]})
        print(f"{arch:9s} b{batch:<4d} {kind:5s} {framework:22s} median {s['median_s']:.4f} s "
              f"({gflops:.1f} GFLOP/s)", flush=True)
      del fns
  config = {"models": cfg.step_models, "batches": cfg.batches, "warmup": cfg.warmup,
            "reps": cfg.reps, "jax_variants": cfg.jax_variants,
            "torch_compile": cfg.torch_compile,
            "torch_compile_backend": cfg.torch_compile_backend}
  res = common.result("step_time", config, rows, load_start, matmul_peak=peak)
  print(table(res), flush=True)
  return res


def table(res: dict) -> str:
  """Markdown table of a step-time result; the last column is the time relative to
  PyTorch eager on the same model, batch and kind."""
  rows, peak = res["rows"], res["matmul_peak"]
  eager = {(r["model"], r["batch"], r["kind"]): r["median_s"] for r in rows
           if r["framework"] == "torch.eager"}
  lines = []
  for r in rows:
    ref = eager.get((r["model"], r["batch"], r["kind"]))
    lines.append([r["model"], r["batch"], r["kind"], r["framework"], common.fmt_s(r["median_s"]),
                  f"{common.fmt_s(r['min_s'])}-{common.fmt_s(r['max_s'])}",
                  f"{r['gflops_per_s']:.1f}", f"{100 * r['fraction_of_peak']:.0f}%",
                  f"{r['median_s'] / ref:.2f}" if ref else "-"])
  return common.markdown_table(
      f"Steady step time (s, median of {res['config']['reps']}); fp32 matmul peak "
      f"{peak['peak_gflops']:.0f} GFLOP/s ({peak['size']}^3)",
      ["model", "batch", "kind", "framework", "median", "min-max", "GFLOP/s", "of peak",
       "time / torch.eager"], lines)
