"""Workload 7: where a JAX train step's time goes, thunk by thunk (XLA:CPU).

The library's train step of ``cfg.profile_model`` at ``cfg.profile_batch`` (and each
``--jax-variants`` step) is compiled with XLA:CPU's per-thunk trace events on
(``xla_cpu_enable_xprof_traceme``, a compile option: the step's code is otherwise
unchanged), ``cfg.reps`` steps are traced with ``jax.profiler``, and every thunk's
time is summed by kind:

* ``conv fwd`` / ``conv dgrad`` / ``conv wgrad``: the convolutions, told apart from
  the compiled HLO: a weight gradient's window spans the whole map (larger than its
  output), an input gradient comes from the step's ``transpose(jvp(...))``;
* ``ynn fusion``: fusions XLA hands to YNNPACK (reductions, with the library's
  compile options);
* ``loop fusion``: XLA's own fused elementwise and reduction loops;
* ``copy/transpose``, ``dot`` and ``other`` thunks.

XLA:CPU runs convolution thunks asynchronously: their trace events cover the launch
only, and their work overlaps the thunks that follow (which may then wait for the
CPU's threads). So the conv rows count launches, not kernel time (the ``convs``
workload times the kernels alone), and the other rows are each kind's time in the
step, waits for busy threads included. The table gives the thunks' sum and the
step's wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import numpy as np

from experiments.bench import common, setups

KINDS = ("conv fwd", "conv dgrad", "conv wgrad", "ynn fusion", "loop fusion",
         "copy/transpose", "dot", "other")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_WINDOW = re.compile(r"window=\{size=([\dx]+)")


def _spatial(shape: str) -> int:
  """Product of dims 1 and 2 of an HLO shape like ``f32[16,3,3,64]{3,2,1,0}``."""
  dims = [int(d) for d in shape[shape.index("[") + 1:shape.index("]")].split(",")]
  return dims[1] * dims[2]


def thunk_kinds(hlo_text: str) -> dict[str, str]:
  """``{instruction name: kind}`` (:data:`KINDS`) of every instruction of a compiled
  HLO module's text."""
  kinds = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, op = m.groups()
    if op == "convolution":
      window = _WINDOW.search(line)
      size = int(np.prod([int(v) for v in window.group(1).split("x")])) if window else 1
      if size > _spatial(shape):
        kinds[name] = "conv wgrad"
      elif "transpose(" in line:
        kinds[name] = "conv dgrad"
      else:
        kinds[name] = "conv fwd"
    elif op == "fusion":
      kinds[name] = "ynn fusion" if name.startswith("ynn_fusion") else "loop fusion"
    elif op in ("copy", "transpose"):
      kinds[name] = "copy/transpose"
    elif op == "dot":
      kinds[name] = "dot"
    elif op not in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
      kinds[name] = "other"
  return kinds


def _trace_events(trace_dir: str) -> list[dict]:
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)
  return events["traceEvents"] if isinstance(events, dict) else events


def profile_step(stepper, hlo_text: str, reps: int) -> dict:
  """Traces ``reps`` calls of ``stepper`` (already warm) and sums each thunk kind.

  Returns ``{"wall_ms_per_step", "kinds": {kind: {"ms_per_step", "calls_per_step"}},
  "top": [{"name", "kind", "ms_per_step"}, ...]}`` (the 10 costliest thunks).
  """
  import jax
  kinds = thunk_kinds(hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(reps):
        stepper()
      wall = time.perf_counter() - start
    events = _trace_events(trace_dir)
  total_us: dict[str, float] = collections.defaultdict(float)
  calls: dict[str, int] = collections.Counter()
  per_thunk: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and e.get("name") in kinds:
      kind = kinds[e["name"]]
      total_us[kind] += e["dur"]
      calls[kind] += 1
      per_thunk[e["name"]] += e["dur"]
  top = sorted(per_thunk.items(), key=lambda kv: -kv[1])[:10]
  return {"wall_ms_per_step": 1e3 * wall / reps,
          "kinds": {k: {"ms_per_step": total_us[k] / 1e3 / reps,
                        "calls_per_step": calls[k] / reps} for k in KINDS},
          "top": [{"name": n, "kind": kinds[n], "ms_per_step": us / 1e3 / reps}
                  for n, us in top]}


def run(cfg) -> dict:
  """Profiles the train step of ``cfg.profile_model`` for ``jax.jit`` and each
  ``cfg.jax_variants``."""
  import jax
  import jax.numpy as jnp
  from experiments.bench import variants
  load_start = common.loadavg()
  arch, batch = cfg.profile_model, cfg.profile_batch
  model, variables, _ = setups.jax_model(arch)
  x, y = setups.random_batch(batch)
  rows, profiles = [], {}
  for name in ["jax.jit", *cfg.jax_variants]:
    step, state = setups.jax_train(variants.model_for(name, model), variables,
                                   variants.train_step_fn(name), variants.option_set(name),
                                   extra_options={"xla_cpu_enable_xprof_traceme": True})
    compiled = step.lower(state, jnp.asarray(x), jnp.asarray(y)).compile()
    stepper = setups.JaxStepper(compiled, state, x, y)
    for _ in range(max(cfg.warmup, 1)):
      stepper()
    prof = profile_step(stepper, compiled.as_text(), cfg.reps)
    profiles[name] = prof
    for kind, v in prof["kinds"].items():
      rows.append({"model": arch, "batch": batch, "variant": name, "kind": kind, **v})
    print(f"profile {arch} b{batch} {name}: {prof['wall_ms_per_step']:.0f} ms/step; " + ", ".join(
        f"{k} {v['ms_per_step']:.0f}" for k, v in prof["kinds"].items()), flush=True)
    del stepper
    jax.clear_caches()
  config = {"model": arch, "batch": batch, "reps": cfg.reps, "warmup": cfg.warmup,
            "variants": ["jax.jit", *cfg.jax_variants]}
  res = common.result("step_profile", config, rows, load_start,
                      wall_ms_per_step={n: p["wall_ms_per_step"] for n, p in profiles.items()},
                      top={n: p["top"] for n, p in profiles.items()})
  print(table(res), flush=True)
  return res


def table(res: dict) -> str:
  """Markdown table: ms per step of each thunk kind (columns: the variants)."""
  c = res["config"]
  names = c["variants"]
  by = {(r["variant"], r["kind"]): r for r in res["rows"]}
  lines = []
  for kind in KINDS:
    lines.append([kind, *(f"{by[(n, kind)]['ms_per_step']:.1f} "
                          f"({by[(n, kind)]['calls_per_step']:.0f})" for n in names)])
  lines.append(["**sum of thunks**", *(
      f"{sum(by[(n, k)]['ms_per_step'] for k in KINDS):.0f}" for n in names)])
  lines.append(["**step wall time**", *(f"{res['wall_ms_per_step'][n]:.0f}" for n in names)])
  return common.markdown_table(
      f"Train step of {c['model']} at batch {c['batch']}, thunk time by kind "
      f"(ms per step (thunks per step), {c['reps']} traced steps; conv rows: launches only)",
      ["thunk kind", *names], lines)
