"""Workload 5: masked against compacted inference, the real speed-up of pruning.

A model is pruned to ``--compact-target`` of its FLOPs (L1-norm importance, the
library's global pruner with the reference safeguards), then
:func:`picpq_jax.compress.compact` slices the kept channels out into a smaller
dense model. Masks zero channels but leave every convolution its full width, so
only the compacted model runs fewer FLOPs. Timed: jitted inference of both, of the
compacted model with every group padded to a multiple of each ``--compact-pads``
(``compact(..., pad_to=n)``: a few pruned channels kept, masked and zeroed, so
odd widths such as 7 or 13 become 8 or 16), of the masked and the compacted model
with convolution algorithms tuned per shape (``+tuned``:
:mod:`picpq_jax.models.conv_algorithms`, tuned at each batch size before timing,
the tuning's seconds and choices recorded), of the masked and the compacted model
run on micro-batches of each ``--compact-chunks`` size inside one program
(``+chunk<n>``: the chunks unrolled, so each chunk's activations may stay in the
caches; ``+map<n>``: the same with ``lax.map``), and, for ResNets with PyTorch present,
the eager full model against the physically pruned twin. The JSON records every
model's MACs and the largest logit difference from the masked model.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import common, setups
from experiments.bench.step_time import measure_round_robin
from picpq_jax.compress import compact, cost_model, criteria, pic
from picpq_jax.compress.compact import kept_channels
from picpq_jax.compress.prune import prune_to_budget
from picpq_jax.models import conv_algorithms, model_structure


def pruned_variables(variables, structure, target: float) -> dict:
  """``variables`` with masks from L1-norm importance pruned to ``target`` of the FLOPs."""
  fp = criteria.l1_norm(variables["params"], structure)
  n = len(pic.prunable_layers(structure))
  importance = pic.pic_importance(fp, jnp.ones(n), jnp.zeros(n), structure)
  masks = prune_to_budget(importance, structure, target).masks
  return {**variables, "masks": masks}


def run(cfg) -> dict:
  """Inference times of the masked and compacted ``cfg.compact_model``."""
  load_start = common.loadavg()
  arch = cfg.compact_model
  model, variables, structure = setups.jax_model(arch)
  masked = pruned_variables(variables, structure, cfg.compact_target)
  pads = {"jax.compacted": 1, **{f"jax.compacted+pad{p}": int(p) for p in cfg.compact_pads}}
  smalls = {name: compact(model, masked, structure, pad_to=pad) for name, pad in pads.items()}
  macs = {"masked": int(structure.macs),
          "masked_effective": float(cost_model.cost(structure, masked["masks"]).macs),
          **{name.removeprefix("jax."): int(model_structure(small, structure.input_shape).macs)
             for name, (small, _) in smalls.items()}}
  infer_full = setups.jax_infer(model)
  infers = {name: (setups.jax_infer(small), small_vars)
            for name, (small, small_vars) in smalls.items()}
  torch_ok = cfg.use_torch and arch.startswith("resnet")
  if torch_ok:
    import torch
    from experiments.bench import torch_models
    full_t = setups.torch_model(arch, variables)
    small_t = torch_models.prune_resnet(full_t, structure, kept_channels(masked["masks"]))
    t_full, t_small = setups.torch_infer(full_t, False), setups.torch_infer(small_t, False)
  rows, diffs, tuning = [], [], {}
  for batch in cfg.batches:
    x = jnp.asarray(setups.random_batch(batch)[0])
    reference = infer_full(masked, x)
    runs = {"jax.masked": (infer_full, masked), **infers,
            **_tuned({"jax.masked+tuned": (model, masked),
                      "jax.compacted+tuned": smalls["jax.compacted"]}, x, tuning, batch),
            **_chunked({"jax.masked": (model, masked),
                        "jax.compacted": smalls["jax.compacted"]}, cfg.compact_chunks, batch)}
    diffs += [float(jnp.max(jnp.abs(reference - f(v, x)))) for f, v in runs.values()]
    fns = {name: lambda x=x, f=f, v=v: jax.block_until_ready(f(v, x))
           for name, (f, v) in runs.items()}
    if torch_ok:
      xt = setups.torch_nchw(np.asarray(x))
      fns["torch.eager.full"] = lambda xt=xt: t_full(xt)
      fns["torch.eager.pruned"] = lambda xt=xt: t_small(xt)
    stats = measure_round_robin(fns, warmup=max(cfg.warmup, 1), reps=cfg.reps)
    for name, s in stats.items():
      rows.append({"model": arch, "batch": batch, "variant": name, **s})
      print(f"compact {arch} b{batch:<4d} {name:18s} median {s['median_s']:.4f} s", flush=True)
  settings = {"model": arch, "target": cfg.compact_target, "batches": cfg.batches,
              "pads": [int(p) for p in cfg.compact_pads],
              "chunks": [int(c) for c in cfg.compact_chunks],
              "reps": cfg.reps, "warmup": cfg.warmup}
  res = common.result("compacted", settings, rows, load_start, macs=macs,
                      max_logit_diff=max(diffs), conv_tuning=tuning)
  print(table(res), flush=True)
  return res


def _tuned(models: dict, x, tuning: dict, batch: int) -> dict:
  """``{name: (infer, variables)}`` of each ``(model, variables)`` jitted and traced
  with its convolution algorithms tuned at ``x``'s shape; the tuning's wall seconds
  and results go to ``tuning[f"{name} b{batch}"]``."""
  runs = {}
  for name, (model, variables) in models.items():
    start = time.perf_counter()
    results = conv_algorithms.tune(lambda v, x, m=model: m.apply(v, x), variables, x,
                                   compiler_options=setups.compiler_options(None))
    infer = setups.jax_infer(model.clone())  # a new jit: traced under the tuned table
    with conv_algorithms.use(conv_algorithms.chosen(results)):
      jax.block_until_ready(infer(variables, x))
    tuning[f"{name} b{batch}"] = {"seconds": time.perf_counter() - start, "shapes": results}
    runs[name] = (infer, variables)
  return runs


def _chunked(models: dict, chunks, batch: int) -> dict:
  """``{name+chunk<n> | name+map<n>: (infer, variables)}``: jitted inference of each
  ``(model, variables)`` on ``batch // n`` micro-batches of ``n`` images, unrolled or
  with ``lax.map`` (sizes that do not divide ``batch`` are skipped)."""
  runs = {}
  for n in (int(c) for c in chunks):
    if n >= batch or batch % n:
      continue
    for name, (model, variables) in models.items():
      def unrolled(v, x, m=model, n=n):
        parts = [m.apply(v, x[i:i + n], train=False) for i in range(0, x.shape[0], n)]
        return jnp.concatenate(parts)

      def mapped(v, x, m=model, n=n):
        chunks = x.reshape(-1, n, *x.shape[1:])
        return jax.lax.map(lambda c: m.apply(v, c, train=False), chunks).reshape(x.shape[0], -1)

      options = setups.compiler_options(None)
      runs[f"{name}+chunk{n}"] = (jax.jit(unrolled, compiler_options=options), variables)
      runs[f"{name}+map{n}"] = (jax.jit(mapped, compiler_options=options), variables)
  return runs


def table(res: dict) -> str:
  """Markdown table of a masked-vs-compacted result (speed-up over the unpruned run of
  the same framework and batch)."""
  rows, macs = res["rows"], res["macs"]
  by = {(r["batch"], r["variant"]): r["median_s"] for r in rows}
  full = lambda v: "jax.masked" if v.startswith("jax.") else "torch.eager.full"
  lines = [[r["batch"], r["variant"], common.fmt_s(r["median_s"]),
            f"{common.fmt_s(r['min_s'])}-{common.fmt_s(r['max_s'])}",
            f"{by[(r['batch'], full(r['variant']))] / r['median_s']:.2f}x"] for r in rows]
  return common.markdown_table(
      f"Masked vs compacted {res['config']['model']} inference (pruned to "
      f"{macs['compacted'] / macs['masked']:.0%} of the MACs, padded "
      + ", ".join(f"{k.split('+')[1]} {v / macs['masked']:.0%}" for k, v in macs.items()
                  if "+pad" in k)
      + f"; max logit difference "
      f"{res['max_logit_diff']:.1e})",
      ["batch", "variant", "median s", "min-max", "speed-up vs unpruned"], lines)
