"""Workload 3: the HRank filter property (average feature-map rank per filter) of a
whole network over the reference's 6 batches of 128 training images.

Three ways, each from the images to ``{layer: float32 [C]}``, forward passes
included:

* ``ours.svd`` and ``ours.bidiagonal``:
  :func:`picpq_jax.compress.criteria.filter_property` (``"rank"``) with either
  rank method: one jitted program per batch shape that runs the model and ranks
  every map (by LAPACK's batched SVD, or by the library's batched Householder
  bidiagonalization and Sturm counts). ``first_call_s`` is the warm-up call over
  all batches, compilation included.
* ``torch.loop``: the reference's way (HRank's ``rank_generation.py``): a forward
  hook per ReLU and ``torch.linalg.matrix_rank(map).item()`` for each ``[H, W]`` map
  of each image and channel, one call per map.
* ``torch.batched``: the same maps, one batched ``torch.linalg.matrix_rank`` call
  per layer and batch.
* ``numpy.loop``: the same per-map loop with ``numpy.linalg.matrix_rank`` (on the
  PyTorch maps), as a NumPy user would write it.

Images: the bundled 5,000-image CIFAR-10 subset (``picpq_jax.data.load_embedded``),
normalized; weights: the He initialization (ranks need no trained model to be
timed). The JSON also records how far the three results agree.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import common, setups
from picpq_jax import data as pdata
from picpq_jax.compress import criteria


def image_batches(count: int, size: int, image_size: int = 32) -> list[np.ndarray]:
  """``count`` normalized float32 NHWC batches of ``size`` CIFAR-10 training images,
  center-cropped to ``image_size`` pixels (smaller maps: a quick run compiles less)."""
  ds = pdata.load_embedded()
  if count * size > len(ds):
    raise ValueError(f"{count} x {size} images asked, the bundled set has {len(ds)}")
  mean = np.asarray(pdata.CIFAR10_MEAN, np.float32)
  std = np.asarray(pdata.CIFAR10_STD, np.float32)
  x = (ds.images[:count * size].astype(np.float32) / 255.0 - mean) / std
  top = (x.shape[1] - image_size) // 2
  x = x[:, top:top + image_size, top:top + image_size]
  return list(x.reshape(count, size, *x.shape[1:]))


def torch_rank_property(module, batches: list[np.ndarray], names: list[str], *,
                        how: str) -> dict[str, np.ndarray]:
  """HRank property from PyTorch maps: ``{layer: float64 [C]}`` mean rank per channel.

  ``how``: ``"batched"``, one ``torch.linalg.matrix_rank`` call per layer map
  ``[N, C, H, W]``; ``"loop"``, one call per ``[H, W]`` map with ``.item()``, as the
  reference does; ``"numpy"``, one ``numpy.linalg.matrix_rank`` call per map.
  """
  import torch
  from experiments.bench import torch_models
  module.eval()
  totals = [None] * len(names)
  count = 0
  with torch.inference_mode():
    for x in batches:
      maps = torch_models.feature_maps(module, setups.torch_nchw(x))
      for i, m in enumerate(maps):
        n, c = m.shape[:2]
        if how == "batched":
          ranks = torch.linalg.matrix_rank(m).sum(0).double().numpy()
        elif how == "loop":
          ranks = np.array([[torch.linalg.matrix_rank(m[a, b, :, :]).item() for b in range(c)]
                            for a in range(n)], np.float64).sum(0)
        else:
          m = m.numpy()
          ranks = np.array([[np.linalg.matrix_rank(m[a, b]) for b in range(c)]
                            for a in range(n)], np.float64).sum(0)
        totals[i] = ranks if totals[i] is None else totals[i] + ranks
      count += x.shape[0]
  return {name: t / count for name, t in zip(names, totals)}


def _agreement(a: dict, b: dict) -> dict:
  diff = [np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) for k in a]
  flat = np.concatenate(diff)
  return {"max_abs_diff": float(flat.max()), "fraction_equal": float(np.mean(flat < 1e-6))}


def run(cfg) -> dict:
  """Times the three ways on ``cfg.hrank_model`` over ``cfg.hrank_batches`` batches."""
  load_start = common.loadavg()
  arch = cfg.hrank_model
  model, variables, structure = setups.jax_model(arch)
  batches = image_batches(cfg.hrank_batches, cfg.hrank_batch_size, cfg.hrank_image_size)
  jbatches = [jnp.asarray(b) for b in batches]
  names = [l.name for l in structure.layers if l.out_group is not None]
  maps = sum(b.shape[0] for b in batches) * sum(structure.layer(n).out_features for n in names)

  results = {}

  def ours(method):
    results[f"ours.{method}"] = jax.block_until_ready(criteria.filter_property(
        "rank", model, variables, jbatches, structure, method=method))

  fns = {f"ours.{m}": (functools.partial(ours, m), cfg.reps) for m in criteria.RANK_METHODS}
  if cfg.use_torch:
    module = setups.torch_model(arch, variables)

    def by_torch(how, key):
      results[key] = torch_rank_property(module, batches, names, how=how)

    fns["torch.batched"] = (functools.partial(by_torch, "batched", "torch.batched"), cfg.reps)
    fns["torch.loop"] = (functools.partial(by_torch, "loop", "torch.loop"), cfg.loop_reps)
    fns["numpy.loop"] = (functools.partial(by_torch, "numpy", "numpy.loop"), cfg.loop_reps)
  rows = []
  for name, (fn, reps) in fns.items():
    first = None
    if not name.endswith(".loop"):  # the first call compiles (JAX) or warms up (torch)
      start = time.perf_counter()
      fn()
      first = time.perf_counter() - start
    s = common.measure(fn, warmup=max(cfg.warmup - 1, 0) if first else 0, reps=reps)
    rows.append({"model": arch, "method": name, "images": cfg.hrank_batches * cfg.hrank_batch_size,
                 "maps": maps, **s, "first_call_s": first, "us_per_map": 1e6 * s["median_s"] / maps})
    print(f"hrank {arch} {name:16s} median {s['median_s']:.3f} s (first call "
          f"{common.fmt_s(first)} s)", flush=True)
  reference = "ours.svd"
  agreement = {f"{reference}_vs_{k}": _agreement(results[reference], results[k])
               for k in results if k != reference}
  config = {"model": arch, "batches": cfg.hrank_batches, "batch_size": cfg.hrank_batch_size,
            "image_size": cfg.hrank_image_size,
            "reps": cfg.reps, "loop_reps": cfg.loop_reps, "warmup": cfg.warmup}
  res = common.result("hrank", config, rows, load_start, agreement=agreement)
  print(table(res), flush=True)
  return res


def table(res: dict) -> str:
  """Markdown table of an HRank result; the last column is each method's time over
  ``ours.bidiagonal``'s, followed by the rank agreement line."""
  rows, c = res["rows"], res["config"]
  base = {r["method"]: r["median_s"] for r in rows}["ours.bidiagonal"]
  lines = [[r["method"], common.fmt_s(r["median_s"]),
            f"{common.fmt_s(r['min_s'])}-{common.fmt_s(r['max_s'])}", r["reps"],
            common.fmt_s(r["first_call_s"]), f"{r['us_per_map']:.2f}",
            f"{r['median_s'] / base:.1f}x"] for r in rows]
  agree = ", ".join(f"{k.replace('_vs_', ' vs ')}: {100 * v['fraction_equal']:.2f}% of channels equal"
                    for k, v in res["agreement"].items())
  return common.markdown_table(
      f"HRank property of {c['model']}, {c['batches']} batches of {c['batch_size']} "
      f"{c['image_size']}x{c['image_size']} images ({rows[0]['maps']:,} maps)",
      ["method", "median s", "min-max", "reps", "first call s", "us/map",
       "time / ours.bidiagonal"], lines) + f"\nAgreement of the mean ranks: {agree}.\n"
