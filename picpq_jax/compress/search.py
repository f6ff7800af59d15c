"""The ``(a, b)`` search as a task of the run engine: each generation is a step.

:mod:`picpq_jax.compress.evolution` holds the pure pieces. Step 0 scores the initial
population; step ``g`` runs generation ``g`` with :func:`evolution.evolve`. One heavy
program is compiled for a whole search (scoring ``children`` candidates), shared by
both. The engine (:func:`picpq_jax.engine.run_task`) saves the population after
every generation, so a stopped search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from picpq_jax import compile_options
from picpq_jax import data as pdata
from picpq_jax import engine
from picpq_jax.compress import evolution, pic
from picpq_jax.options import check, option
from picpq_jax.utils import is_primary, read_json, write_json

Array = jax.Array


SAMPLINGS = ("replace", "distinct")
RETURNS = ("best-ever", "final")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Settings of the evolution (reference values as defaults, DESIGN 4)."""

  population: int = option(64, "members of the evolving population")
  sample: int = option(16, "tournament sample size")
  generations: int = option(400, "generations of regularized evolution")
  children: int = option(1, "children evaluated per generation (in one program)")
  tau_hat: int = option(200, "SGD steps of masked fine-tuning per fitness evaluation")
  mutation_rate: float = option(0.1, "fraction of layers a child mutates")
  search_batch_size: int = option(128, "batch size of the fitness fine-tuning and validation")
  search_val_size: int = option(1000, "validation images that score a candidate")
  strategy: str = option("auto", "how candidates are evaluated: map, unroll or vmap (one program, masked), compact (one by one at the pruned size), or auto (chosen per backend and tau_hat)")
  identity_seed: bool = option(True, "member 0 of the initial population is a=1, b=0 (the reference)")
  sampling: str = option("replace", "tournament members and mutated layers drawn with replacement (replace, the reference) or distinct (distinct)")
  returns: str = option("best-ever", "genes returned: best-ever (the fittest ever evaluated, the reference) or final (the fittest of the final population)")

  def __post_init__(self):
    checks = [
        (self.population >= 2, "population", "an integer >= 2"),
        (self.generations >= 0, "generations", "an integer >= 0"),
        (self.tau_hat >= 1, "tau_hat", "an integer >= 1"),
        (0.0 < self.mutation_rate <= 1.0, "mutation_rate", "(0, 1]"),
        (self.search_batch_size >= 1, "search_batch_size", "an integer >= 1"),
        (self.search_val_size >= 1, "search_val_size", "an integer >= 1"),
        (self.strategy in evolution.STRATEGY_OPTIONS, "strategy",
         " or ".join(evolution.STRATEGY_OPTIONS)),
        (self.sampling in SAMPLINGS, "sampling", " or ".join(SAMPLINGS)),
        (self.returns in RETURNS, "returns", " or ".join(RETURNS)),
    ]
    for ok, field, allowed in checks:
      check(ok, field, getattr(self, field), allowed)


def stage_search_data(train: pdata.ImageDataset, val: pdata.ImageDataset, config: SearchConfig,
                      seed: int, generation: int) -> evolution.SearchData:
  """The batches of one generation: ``tau_hat`` training batches drawn for
  ``(seed, generation)`` and the first ``search_val_size`` validation images."""
  bs = config.search_batch_size
  batches = pdata.iterate_batches(train, bs, seed + 7919 * generation, process_count=1,
                                  process_index=0)
  steps = [next(batches) for _ in range(config.tau_hat)]
  val_subset = val.subset(np.arange(min(config.search_val_size, len(val))))
  val_batches = list(pdata.eval_batches(val_subset, bs, process_count=1, process_index=0))
  return evolution.SearchData(
      train_images=jnp.asarray(np.stack([s["image"] for s in steps])),
      train_labels=jnp.asarray(np.stack([s["label"] for s in steps])),
      val_images=jnp.asarray(np.stack([v["image"] for v in val_batches])),
      val_labels=jnp.asarray(np.stack([v["label"] for v in val_batches])),
      val_weights=jnp.asarray(np.stack([v["mask"] for v in val_batches]), jnp.float32))


@dataclasses.dataclass(frozen=True)
class SearchResult:
  a: np.ndarray  # float32 [L], best genes
  b: np.ndarray  # float32 [L]
  loss: float  # its validation loss after tau_hat steps
  best_loss_history: tuple[float, ...]  # best loss in the population after generation 0 (initial), 1, ...
  generations: int
  best_ever_history: tuple[float, ...] = ()  # best loss evaluated up to generation 0, 1, ...


def run_search(spec: evolution.FitnessSpec, config: SearchConfig, variables: Mapping[str, Any],
               fp: Mapping[str, Array], train: pdata.ImageDataset, val: pdata.ImageDataset,
               workdir: str, *, seed: int = 0, mesh: Mesh | None = None,
               progress: bool = True, stop_after: int | None = None) -> SearchResult:
  """Runs (or resumes) the evolution; checkpoints in ``workdir`` after each generation.

  Args:
    spec: static fitness description (model, optimizer, budget, strategy).
    config: search settings (all must match a search being resumed).
    variables: pretrained variables; fine-tuning of every candidate starts here.
    fp: ``{layer: float32 [C]}`` filter property.
    train, val: datasets the fitness draws its batches from.
    workdir: the search's folder (``config.json``, ``checkpoints/``, ``metrics.jsonl``).
    seed: seed of genes, selection, mutation and batches.
    mesh: optional mesh with a ``population`` axis over which candidates are split.
    progress: show a progress bar.
    stop_after: stop after this many generations (as if interrupted).
  """
  num_devices = 1 if mesh is None else mesh.size
  # "auto" resolves here, where tau_hat and the devices are known.
  spec = dataclasses.replace(spec, strategy=evolution.resolve_strategy(
      spec.strategy, config.tau_hat, num_devices))
  evolution.check_settings(config.population, config.sample, config.children, num_devices)
  saved = os.path.join(workdir, "config.json")
  if os.path.exists(saved):
    engine.check_resume(read_json(saved), config, workdir)
  elif is_primary():
    os.makedirs(workdir, exist_ok=True)
    write_json(saved, dataclasses.asdict(config))
  evaluate = _evaluate_program(spec, mesh)
  fp_std = pic.fp_std(fp, spec.structure)
  key = jax.random.key(seed)

  def step(population, data, index):
    if index == 0:  # score the initial population, `children` at a time
      a, b = evolution.initial_population(jax.random.fold_in(key, 0), fp, spec.structure,
                                          config.population, identity=config.identity_seed)
      k = config.children
      loss = jnp.concatenate([
          evaluate(variables, fp, data, jax.random.fold_in(key, 1), a[i:i + k], b[i:i + k])
          for i in range(0, config.population, k)])
      population = evolution.start_population(a, b, loss)
    else:
      population = evolution.evolve(
          population, jax.random.fold_in(key, 1000 + index - 1), variables, fp, data,
          evaluate=evaluate, fp_std=fp_std, sample=config.sample, children=config.children,
          generations=config.generations, mutation_rate=config.mutation_rate,
          replace=config.sampling == "replace")
    return population, {"best_loss": float(jnp.min(population.loss)),
                        "best_ever_loss": float(population.best_loss)}

  template = _template(spec, config)
  task = engine.Task(
      init=lambda: template, template=template, total=config.generations + 1,
      batches=lambda start: (stage_search_data(train, val, config, seed, g)
                             for g in itertools.count(start)),
      step=step, label="evolution", unit="gen")
  outcome = engine.run_task(task, workdir, progress=progress,
                            stop_at=None if stop_after is None else stop_after + 1)
  a, b, loss = evolution.best(outcome.state, ever=config.returns == "best-ever")
  return SearchResult(np.asarray(a), np.asarray(b), float(loss),
                      tuple(r["best_loss"] for r in outcome.records),
                      int(outcome.state.generation),
                      tuple(r.get("best_ever_loss", r["best_loss"]) for r in outcome.records))


@functools.lru_cache(maxsize=8)
def _evaluate_program(spec: evolution.FitnessSpec, mesh: Mesh | None):
  """The jitted heavy program that scores ``children`` candidates (prune, fine-tune,
  validate), cached so that a resumed or repeated search in the same process compiles
  nothing new; the initial population and every generation use it. Strategy
  ``compact`` is Python-driven and caches its programs by the candidates' widths."""
  fn = evolution.sharded_population_loss(spec, mesh)
  return fn if spec.strategy == "compact" else compile_options.jit(fn)


def _template(spec, config: SearchConfig) -> evolution.Population:
  num_layers = len(pic.prunable_layers(spec.structure))
  p = config.population
  return evolution.Population(
      a=jnp.zeros((p, num_layers), jnp.float32), b=jnp.zeros((p, num_layers), jnp.float32),
      loss=jnp.zeros((p,), jnp.float32), born=jnp.zeros((p,), jnp.int32),
      generation=jnp.int32(0), best_a=jnp.zeros((num_layers,), jnp.float32),
      best_b=jnp.zeros((num_layers,), jnp.float32), best_loss=jnp.float32(0))
