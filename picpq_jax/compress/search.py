"""The ``(a, b)`` search driver: stages data, runs generations, checkpoints each one.

:mod:`picpq_jax.compress.evolution` holds the pure pieces; this module is the loop
around them. One heavy program is compiled for a whole search (scoring
``children`` candidates), plus two tiny ones (propose, replace). The population is
saved (Orbax) after every generation, so a stopped search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from picpq_jax import compile_options
from picpq_jax import data as pdata
from picpq_jax.compress import evolution, pic
from picpq_jax.errors import UserError
from picpq_jax.options import check, option
from picpq_jax.train.checkpoint import Checkpoints

Array = jax.Array


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
  strategy: str = option("map", "candidates in one program: map, unroll or vmap")

  def __post_init__(self):
    checks = [
        (self.population >= 2, "population", "an integer >= 2"),
        (self.generations >= 0, "generations", "an integer >= 0"),
        (self.tau_hat >= 1, "tau_hat", "an integer >= 1"),
        (0.0 < self.mutation_rate <= 1.0, "mutation_rate", "(0, 1]"),
        (self.search_batch_size >= 1, "search_batch_size", "an integer >= 1"),
        (self.search_val_size >= 1, "search_val_size", "an integer >= 1"),
        (self.strategy in evolution.STRATEGIES, "strategy", " or ".join(evolution.STRATEGIES)),
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
  best_loss_history: tuple[float, ...]  # best loss after generation 0 (initial), 1, ...
  generations: int


def run_search(spec: evolution.FitnessSpec, config: SearchConfig, variables: Mapping[str, Any],
               fp: Mapping[str, Array], train: pdata.ImageDataset, val: pdata.ImageDataset,
               workdir: str, *, seed: int = 0, mesh: Mesh | None = None,
               progress: bool = True, stop_after: int | None = None) -> SearchResult:
  """Runs (or resumes) the evolution; checkpoints in ``workdir`` after each generation.

  Args:
    spec: static fitness description (model, optimizer, budget, strategy).
    config: search settings.
    variables: pretrained variables; fine-tuning of every candidate starts here.
    fp: ``{layer: float32 [C]}`` filter property.
    train, val: datasets the fitness draws its batches from.
    workdir: checkpoint folder of the search.
    seed: seed of genes, selection, mutation and batches.
    mesh: optional mesh with a ``population`` axis over which candidates are split.
    progress: show a progress bar.
    stop_after: stop after this many generations (as if interrupted).
  """
  num_devices = 1 if mesh is None else mesh.size
  evolution.check_settings(config.population, config.sample, config.children, num_devices)
  evaluate, propose, replace = _programs(spec, mesh, config.sample, config.children,
                                        config.generations, config.mutation_rate)
  fp_std = pic.fp_std(fp, spec.structure)
  key = jax.random.key(seed)
  checkpoints = Checkpoints(workdir, save_every=1, keep=2)
  meta = {"config": dataclasses.asdict(config)}

  latest = checkpoints.latest_step()
  if latest is not None:
    template = _template(spec, config)
    population, saved = checkpoints.restore(template, latest)
    if saved.get("config") != meta["config"]:
      raise UserError(f"cannot resume the search in {workdir}: it was run with other "
                      f"settings ({saved.get('config')}); use the same or another workdir")
    history = list(saved["best_loss_history"])
  else:
    a, b = evolution.initial_population(jax.random.fold_in(key, 0), fp, spec.structure,
                                        config.population)
    data0 = stage_search_data(train, val, config, seed, 0)
    k = config.children  # the same program scores the initial population, k at a time
    loss = jnp.concatenate([
        evaluate(variables, fp, data0, jax.random.fold_in(key, 1), a[i:i + k], b[i:i + k])
        for i in range(0, config.population, k)])
    population = evolution.Population(
        a=a, b=b, loss=loss, born=jnp.zeros(config.population, jnp.int32),
        generation=jnp.int32(0))
    history = [float(jnp.min(loss))]
    checkpoints.save(0, population, {**meta, "best_loss_history": history}, force=True)

  start = int(population.generation)
  end = config.generations if stop_after is None else min(config.generations, stop_after)
  bar = tqdm(total=config.generations, initial=start, disable=not progress,
             desc="evolution", unit="gen", dynamic_ncols=True)
  for gen in range(start, end):
    data = stage_search_data(train, val, config, seed, gen + 1)
    k_propose, k_eval = jax.random.split(jax.random.fold_in(key, 1000 + gen))
    a, b = propose(population, k_propose, fp_std)
    population = replace(population, a, b, evaluate(variables, fp, data, k_eval, a, b))
    history.append(float(jnp.min(population.loss)))
    checkpoints.save(gen + 1, population, {**meta, "best_loss_history": history})
    bar.update(1)
    bar.set_postfix(best_loss=f"{history[-1]:.4f}")
  bar.close()
  checkpoints.close()
  a, b, loss = evolution.best(population)
  return SearchResult(np.asarray(a), np.asarray(b), float(loss), tuple(history),
                      int(population.generation))


@functools.lru_cache(maxsize=8)
def _programs(spec: evolution.FitnessSpec, mesh: Mesh | None, sample: int, children: int,
              generations: int, mutation_rate: float):
  """The jitted pieces of a generation (:func:`evolution.evolve` split in three, so
  the initial population reuses the one heavy program), cached on their static
  inputs so a resumed or repeated search in the same process compiles nothing new.

  Returns ``(evaluate, propose, replace)``: ``evaluate`` scores ``children``
  candidates (prune, fine-tune, validate); the other two are small.
  """
  evaluate = compile_options.jit(evolution.sharded_population_loss(spec, mesh))
  propose = jax.jit(functools.partial(
      evolution.propose, sample=sample, children=children, generations=generations,
      mutation_rate=mutation_rate))
  return evaluate, propose, jax.jit(evolution.replace_oldest)


def _template(spec, config: SearchConfig) -> evolution.Population:
  num_layers = len(pic.prunable_layers(spec.structure))
  p = config.population
  return evolution.Population(
      a=jnp.zeros((p, num_layers), jnp.float32), b=jnp.zeros((p, num_layers), jnp.float32),
      loss=jnp.zeros((p,), jnp.float32), born=jnp.zeros((p,), jnp.int32),
      generation=jnp.int32(0))
