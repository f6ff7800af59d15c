"""Workload 1: compile time of a train step, JAX ``lower + compile`` against
``torch.compile``, each measurement in a fresh process with cold caches.

JAX: ``jax.jit(train_step).lower(...)`` (tracing to StableHLO) plus
``.compile()`` (XLA), with the persistent compilation cache off. PyTorch: the
whole step (``zero_grad, forward, loss, backward, SGD.step``) under
``torch.compile`` with ``TORCHINDUCTOR_CACHE_DIR`` set to a fresh temporary
folder; its compile time is the time of the first two calls (the second call
recompiles the optimizer step once its momentum buffers exist) minus two
steady-state calls. Both children also time steady steps, so the JSON records
what the first calls cost beyond a normal step.

Run one child by hand: ``python -m experiments.bench.compile_time --child jax
--arch resnet20 --batch 128``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.bench import common

ROOT = Path(__file__).resolve().parents[2]
STEADY_CALLS = 3


def _child_jax(arch: str, batch: int, variant: str) -> dict:
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  from experiments.bench import setups, variants
  model, variables, _ = setups.jax_model(arch)
  step, state = setups.jax_train(model, variables, variants.train_step_fn(variant),
                                 variants.option_set(variant))
  x, y = (jax.numpy.asarray(a) for a in setups.random_batch(batch))
  t0 = time.perf_counter()
  lowered = step.lower(state, x, y)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  calls = []
  for _ in range(1 + STEADY_CALLS):
    start = time.perf_counter()
    state, metrics = compiled(state, x, y)
    jax.block_until_ready(metrics)
    calls.append(time.perf_counter() - start)
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0, "calls_s": calls}


def _child_torch(arch: str, batch: int, backend: str) -> dict:
  import torch
  from experiments.bench import setups
  _, variables, _ = setups.jax_model(arch)
  module = setups.torch_model(arch, variables)
  step = setups.torch_train(module, compiled=True, backend=backend)
  x, y = setups.random_batch(batch)
  x, y = setups.torch_nchw(x), torch.from_numpy(y.astype("int64"))
  calls = []
  for _ in range(2 + STEADY_CALLS):
    start = time.perf_counter()
    step(x, y)
    calls.append(time.perf_counter() - start)
  steady = sorted(calls[2:])[len(calls[2:]) // 2]
  return {"first_call_s": calls[0], "second_call_s": calls[1], "calls_s": calls,
          "total_s": calls[0] + calls[1] - 2 * steady}


def _run_child(framework: str, arch: str, batch: int, backend: str, timeout: float) -> dict:
  """One measurement in a fresh process; ``framework`` is ``torch`` or a JAX variant name."""
  env = dict(os.environ)
  with tempfile.TemporaryDirectory(prefix="bench_inductor_") as cache:
    env["TORCHINDUCTOR_CACHE_DIR"] = cache
    env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.compile_time", "--child",
         "torch" if framework == "torch" else "jax", "--variant", framework, "--arch", arch,
         "--batch", str(batch), "--backend", backend],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"compile-time child {framework}/{arch} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run(cfg) -> dict:
  """Compile times for each of ``cfg.compile_models`` (``cfg.compile_reps`` fresh
  processes per framework). Rows: ``{"model", "framework", "batch", median/min/max
  of total_s, "runs": [child results]}``."""
  load_start = common.loadavg()
  frameworks = ["jax.jit", *cfg.jax_variants] + (["torch.compile"] if cfg.use_torch else [])
  rows = []
  for arch in cfg.compile_models:
    for framework in frameworks:
      runs = [_run_child("torch" if framework == "torch.compile" else framework, arch, cfg.compile_batch,
                         cfg.torch_compile_backend, cfg.child_timeout)
              for _ in range(cfg.compile_reps)]
      row = {"model": arch, "framework": framework, "batch": cfg.compile_batch,
             **common.summarize([r["total_s"] for r in runs]), "runs": runs}
      rows.append(row)
      print(f"compile {arch:9s} {framework:13s} median {row['median_s']:.2f} s", flush=True)
  config = {"models": cfg.compile_models, "batch": cfg.compile_batch, "reps": cfg.compile_reps,
            "jax_variants": cfg.jax_variants,
            "torch_compile_backend": cfg.torch_compile_backend}
  res = common.result("compile_time", config, rows, load_start)
  print(table(res), flush=True)
  return res


def table(res: dict) -> str:
  """Markdown table of a compile-time result: one row per model and framework (JAX
  variants included), with ``torch.compile``'s time over each row's."""
  rows = res["rows"]
  torch_s = {r["model"]: r["median_s"] for r in rows if r["framework"] == "torch.compile"}
  lines = [[r["model"], r["framework"], common.fmt_s(r["median_s"]),
            f"{common.fmt_s(r['min_s'])}-{common.fmt_s(r['max_s'])}",
            f"{torch_s[r['model']] / r['median_s']:.1f}x" if r["model"] in torch_s else "-"]
           for r in rows]
  return common.markdown_table(
      f"Compile time of a train step, batch {res['config']['batch']} (s, fresh process, cold "
      f"cache, {res['config']['reps']} runs; JAX: lower + compile)",
      ["model", "framework", "median s", "min-max", "torch.compile / this"], lines)


def _main() -> None:
  parser = argparse.ArgumentParser(description="one compile-time measurement (child process)")
  parser.add_argument("--child", choices=["jax", "torch"], required=True)
  parser.add_argument("--arch", required=True)
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--backend", default="inductor", help="torch.compile backend")
  parser.add_argument("--variant", default="jax.jit", help="JAX train-step variant")
  args = parser.parse_args()
  if args.child == "jax":
    out = _child_jax(args.arch, args.batch, args.variant)
  else:
    out = _child_torch(args.arch, args.batch, args.backend)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  _main()
