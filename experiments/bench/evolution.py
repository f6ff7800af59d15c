"""Workload 4: evolution throughput, candidate evaluations per second of the
``(a, b)`` search's fitness (prune to the budget, ``tau_hat`` masked SGD steps
from the pretrained weights, validation loss).

* ``jax.population/<strategy>``: the library's one-program evaluation of ``K``
  candidates, ``jax.jit(evolution.population_loss)`` with strategy ``map``,
  ``unroll`` or ``vmap``. Each timed call scores fresh genes (a new generation);
  the number of XLA compilations during the timed calls is counted (it must be 0).
* ``jax.compact/pad<m>``: the library's ``strategy="compact"``: each candidate
  fine-tuned and validated at its pruned size, widths padded up to multiples of
  ``m``, programs cached by the padded widths (``evolution._compact_programs``);
  the row counts the new width sets (cache misses) and compilations of each call.
* ``jax.loop``: a Python loop over the candidates of jitted pieces (masks, one
  train step, one eval step), the fastest plain-JAX way.
* ``torch.reference``: the reference's way in PyTorch: per candidate deep-copy the
  full model, build the physically pruned one, fine-tune it ``tau_hat`` steps with
  ``SGD(nesterov)``, validate. Its masks come from the same pruning (computed by
  the jitted JAX function, outside the per-candidate PyTorch work but inside the
  timing), and it is fed the same augmented images, precomputed (a small advantage:
  augmentation is inside the JAX programs).

Every variant scores the same candidates on the same batches, so the JSON records
the largest loss difference between them (PyTorch's differs by float rounding).
Warm-up calls (``--warmup``, may be 0) come first; the timed calls then go round
the variants in turn, each with fresh genes, so load changes hit every variant.
With ``--warmup 0`` the compilations are inside the timed calls, amortized over
``tau_hat`` steps as in a real search.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import common, setups
from picpq_jax import compile_options
from picpq_jax import data as pdata
from picpq_jax.compress import criteria, evolution, search
from picpq_jax.train import create_train_state, eval_step, sgd_nesterov, train_step

_MEAN = np.asarray(pdata.CIFAR10_MEAN, np.float32)
_STD = np.asarray(pdata.CIFAR10_STD, np.float32)


def _preprocess_train(key, images):
  return pdata.normalize(pdata.augment(key, images), _MEAN, _STD)


def _preprocess_eval(images):
  return pdata.normalize(images, _MEAN, _STD)


class CompileCounter:
  """Counts XLA backend compilations while active (``with CompileCounter() as c``)."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0  # their summed durations

  def _listener(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1
      self.seconds += duration

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def _loop_losses(spec, variables, fp, data, key, a, b) -> np.ndarray:
  """Fitness of each candidate by a Python loop of jitted pieces (cached per spec)."""
  masks_fn, step, evaluate = _loop_pieces(spec)
  keys = jax.random.split(key, data.train_images.shape[0])
  losses = []
  for i in range(a.shape[0]):
    state = create_train_state({**variables, "masks": masks_fn(fp, a[i], b[i])}, spec.tx)
    for t in range(data.train_images.shape[0]):
      state = step(state, keys[t], data.train_images[t], data.train_labels[t])
    total = count = 0.0
    for v in range(data.val_images.shape[0]):
      out = evaluate(state.variables, data.val_images[v], data.val_labels[v],
                     data.val_weights[v])
      total += out["loss_sum"]
      count += out["count"]
    losses.append(total / jnp.maximum(count, 1.0))
  return np.asarray(jnp.stack(losses))


@functools.lru_cache(maxsize=4)
def _loop_pieces(spec):
  masks_fn = jax.jit(functools.partial(evolution.candidate_masks, spec))

  def one_step(state, key, images, labels):
    return train_step(state, spec.preprocess_train(key, images), labels, model=spec.model,
                      tx=spec.tx)[0]

  def one_eval(variables, images, labels, weights):
    return eval_step(variables, spec.preprocess_eval(images), labels, weights, model=spec.model)

  # as the library: training with its compile options, evaluation with XLA's defaults
  return masks_fn, compile_options.jit(one_step), jax.jit(one_eval)


def _torch_losses(spec, module, variables, fp, data, key, a, b) -> np.ndarray:
  """Fitness of each candidate the reference's way (see the module docstring)."""
  import torch
  import torch.nn.functional as F
  from experiments.bench import torch_models
  from picpq_jax.compress.compact import kept_channels
  masks_fn = _loop_pieces(spec)[0]
  keys = jax.random.split(key, data.train_images.shape[0])
  train_x = [setups.torch_nchw(np.asarray(spec.preprocess_train(keys[t], data.train_images[t])))
             for t in range(len(keys))]
  train_y = [torch.from_numpy(np.asarray(y, np.int64)) for y in data.train_labels]
  val = [(setups.torch_nchw(np.asarray(spec.preprocess_eval(x))),
          torch.from_numpy(np.asarray(y, np.int64)), torch.from_numpy(np.array(w)))
         for x, y, w in zip(data.val_images, data.val_labels, data.val_weights)]
  losses = []
  for i in range(a.shape[0]):
    kept = kept_channels(jax.device_get(masks_fn(fp, a[i], b[i])))
    pruned = torch_models.prune_resnet(module, spec.structure, kept)
    step = setups.torch_train(pruned, compiled=False)
    for x, y in zip(train_x, train_y):
      step(x, y)
    pruned.eval()
    total = count = 0.0
    with torch.inference_mode():
      for x, y, w in val:
        total += float((F.cross_entropy(pruned(x), y, reduction="none") * w).sum())
        count += float(w.sum())
    losses.append(total / max(count, 1.0))
  return np.asarray(losses)


def run(cfg) -> dict:
  """Candidate throughput of each variant on ``cfg.evo_model``."""
  load_start = common.loadavg()
  arch = cfg.evo_model
  model, variables, structure = setups.jax_model(arch)
  ds = pdata.load_embedded()
  train, val = pdata.train_val_split(ds, max(cfg.evo_val_size, 8), seed=0)
  config = search.SearchConfig(population=cfg.evo_children, sample=1, generations=1,
                               children=cfg.evo_children, tau_hat=cfg.evo_tau_hat,
                               search_batch_size=cfg.evo_batch, search_val_size=cfg.evo_val_size)
  data = search.stage_search_data(train, val, config, seed=0, generation=0)
  fp = criteria.l1_norm(variables["params"], structure)
  spec_for = lambda strategy: evolution.FitnessSpec(
      model=model, structure=structure, tx=sgd_nesterov(setups.LR), target=cfg.evo_target,
      preprocess_train=_preprocess_train, preprocess_eval=_preprocess_eval, strategy=strategy)
  k = cfg.evo_children

  def genes(gen: int):
    return evolution.initial_population(jax.random.key(100 + gen), fp, structure, k)

  variants = {}
  for strategy in cfg.evo_strategies:
    spec = spec_for(strategy)
    if strategy == "compact":
      spec = dataclasses.replace(spec, pad_to=cfg.evo_pad_to)
      name, evaluate = f"jax.compact/pad{cfg.evo_pad_to}", functools.partial(
          evolution.population_loss, spec)
    else:
      name = f"jax.population/{strategy}"
      evaluate = compile_options.jit(functools.partial(evolution.population_loss, spec))
    variants[name] = lambda key, a, b, f=evaluate: np.asarray(f(variables, fp, data, key, a, b))
  loop_spec = spec_for("map")
  variants["jax.loop"] = lambda key, a, b: _loop_losses(loop_spec, variables, fp, data, key, a, b)
  if cfg.use_torch:
    module = setups.torch_model(arch, variables)
    variants["torch.reference"] = (
        lambda key, a, b: _torch_losses(loop_spec, module, variables, fp, data, key, a, b))

  first_s = {}
  for name, fn in variants.items():
    for w in range(cfg.warmup):  # the first call compiles
      a, b = genes(-1 - w)
      start = time.perf_counter()
      fn(jax.random.key(7), a, b)
      first_s.setdefault(name, time.perf_counter() - start)
  times, compiles, compile_s, widths, losses = {}, {}, {}, {}, {}
  for rep in range(cfg.reps):  # round-robin over the variants
    a, b = genes(rep)
    for name, fn in variants.items():
      misses = evolution._compact_programs.cache_info().misses
      with CompileCounter() as counter:
        start = time.perf_counter()
        out = fn(jax.random.key(rep), a, b)
        times.setdefault(name, []).append(time.perf_counter() - start)
      compiles.setdefault(name, []).append(counter.count)
      compile_s.setdefault(name, []).append(counter.seconds)
      widths.setdefault(name, []).append(evolution._compact_programs.cache_info().misses - misses)
      losses.setdefault(name, []).append(out)
      print(f"evolution {arch} rep {rep} {name:26s} {times[name][-1]:.2f} s, "
            f"{counter.count} compiles ({counter.seconds:.1f} s), {widths[name][-1]} new width "
            "sets", flush=True)
  rows = []
  for name in variants:
    s = common.summarize(times[name])
    rows.append({"model": arch, "variant": name, "candidates": k, "tau_hat": cfg.evo_tau_hat,
                 "batch": cfg.evo_batch, "val_images": cfg.evo_val_size, **s,
                 "first_call_s": first_s.get(name, times[name][0]),
                 "compiles_during_timed_calls": int(sum(compiles[name])),
                 "compiles_per_call": compiles[name],
                 "compile_s_in_timed_calls": float(sum(compile_s[name])),
                 "new_width_sets_per_call": widths[name],
                 "candidates_per_s": k / s["median_s"],
                 "candidates_per_s_all_calls": k * cfg.reps / sum(times[name])})
  ref = np.concatenate(losses["jax.loop"])
  agreement = {name: float(np.max(np.abs(np.concatenate(v) - ref))) for name, v in losses.items()}
  settings = {"model": arch, "candidates": k, "tau_hat": cfg.evo_tau_hat, "batch": cfg.evo_batch,
              "val_images": cfg.evo_val_size, "target": cfg.evo_target,
              "strategies": cfg.evo_strategies, "pad_to": cfg.evo_pad_to, "reps": cfg.reps,
              "warmup": cfg.warmup}
  res = common.result("evolution", settings, rows, load_start, max_loss_diff_vs_loop=agreement,
                      losses={n: np.concatenate(v).tolist() for n, v in losses.items()})
  print(table(res), flush=True)
  return res


def table(res: dict) -> str:
  """Markdown table of an evolution result (throughput relative to ``jax.loop`` and,
  where it ran, to ``torch.reference``)."""
  rows, c = res["rows"], res["config"]
  rate = {r["variant"]: r["candidates_per_s"] for r in rows}
  torch_rate = rate.get("torch.reference")
  lines = [[r["variant"], common.fmt_s(r["median_s"]),
            f"{common.fmt_s(r['min_s'])}-{common.fmt_s(r['max_s'])}",
            f"{r['candidates_per_s']:.3f}", f"{r['candidates_per_s'] / rate['jax.loop']:.2f}",
            f"{r['candidates_per_s'] / torch_rate:.2f}" if torch_rate else "-",
            common.fmt_s(r["first_call_s"]),
            f"{r['compiles_during_timed_calls']}" + (
                f" ({r['compile_s_in_timed_calls']:.1f} s)" if "compile_s_in_timed_calls" in r
                else ""),
            "-" if "new_width_sets_per_call" not in r or not r["variant"].startswith("jax.compact")
            else ", ".join(map(str, r["new_width_sets_per_call"])),
            f"{res['max_loss_diff_vs_loop'][r['variant']]:.1e}"] for r in rows]
  warm = c.get("warmup", 1)
  return common.markdown_table(
      f"Evolution fitness of {c['model']}: {c['candidates']} candidates per call, "
      f"tau_hat={c['tau_hat']}, batch {c['batch']}, {c['val_images']} validation images, "
      f"{c['reps']} timed calls with fresh genes"
      + (", compiles inside the timed calls (no warm-up)" if warm == 0 else ""),
      ["variant", "median s", "min-max", "candidates/s", "vs jax.loop", "vs torch.reference",
       "first call s", "compiles in timed calls (s)", "new width sets per call",
       "max loss diff vs loop"], lines)
