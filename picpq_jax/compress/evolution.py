"""Regularized (aging) evolution of the PIC genes ``(a, b)`` (DESIGN 4).

The search state is a :class:`Population` pytree. One generation, :func:`evolve`,
is a pure function compiled once: tournament selection, mutation, pruning of every
child to the budget, ``tau_hat`` masked SGD steps from the pretrained weights,
validation loss, and replacement of the oldest members. The children of a
generation (or the whole initial population) are evaluated inside that one
program, so there is no model rebuilt per candidate and no recompilation across
generations; their axis can be sharded over a ``population`` mesh axis.

How candidates are laid out inside the program is a static choice
(``strategy``), made by measurement per backend:

* ``"map"``: candidates one after another with ``lax.map``, fine-tuning steps with
  ``lax.scan``: a small program, right for accelerators.
* ``"unroll"``: the same computation with the candidate and step loops unrolled
  into straight-line code. On XLA:CPU (jaxlib 0.10.2) convolutions inside a
  ``while`` loop (what ``scan`` and ``map`` lower to) ran 27x slower than the same
  step called from Python (ResNet-20, batch 64: 7.8 s against 0.29 s per step);
  unrolled they run at 0.23 s per step. Compile time grows with
  ``children * tau_hat``, so keep both small on CPU.
* ``"vmap"``: candidates batched; they have their own weights, so XLA turns the
  convolutions into grouped ones (4.4x slower per candidate on a 2-core CPU).
* ``"compact"``: not one program: each candidate is fine-tuned and validated at
  its pruned size (:func:`compact_population_loss`), each group's width rounded up
  to a multiple of ``pad_to`` so that candidates share compiled programs (cached
  by the rounded widths). Python-driven, so not jittable and not sharded.

``"auto"`` (the default of the CLI and :class:`~picpq_jax.compress.search.SearchConfig`)
stands for one of these, by backend and ``tau_hat``: :func:`resolve_strategy`, which
:func:`~picpq_jax.compress.search.run_search` applies to its spec.

Folding candidates into the batch dimension is not possible once their weights
diverge after the first SGD step.

Static: the model, optimizer, structure, filter property, budget and strategy.
Traced: genes, fitness, ages, keys, the data batches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from picpq_jax import compile_options
from picpq_jax.compress import pic
from picpq_jax.compress.compact import compact
from picpq_jax.compress.prune import prune_to_budget
from picpq_jax.errors import UserError
from picpq_jax.models.structure import ModelStructure
from picpq_jax.train.steps import create_train_state, eval_step, train_step

Array = jax.Array

STRATEGIES = ("map", "unroll", "vmap", "compact")
STRATEGY_OPTIONS = (*STRATEGIES, "auto")  # what --strategy accepts
# "auto" (the default of the CLI) resolves per backend by resolve_strategy().
CPU_UNROLL_MAX_STEPS = 8  # CPU: unroll up to this tau_hat, compact above (measured)


def resolve_strategy(strategy: str, tau_hat: int, devices: int = 1,
                     backend: str | None = None) -> str:
  """The strategy ``"auto"`` stands for; any other name is returned unchanged.

  Chosen by measurement on XLA:CPU (``experiments/bench/RESULTS.md``, ResNet-20,
  2 candidates per call, batch 128): ``unroll`` beat ``map`` 12x at ``tau_hat`` 2
  and ``compact`` 1.4x at ``tau_hat`` 8, but its compile time grows faster than
  the steps (64 s at 8, 248 s at 16, over 10 minutes and 5 GB at 32), so above
  ``CPU_UNROLL_MAX_STEPS`` steps ``compact`` is used, or ``map`` where candidates
  are split over devices (``compact`` runs on one). On accelerators ``map`` (small
  programs; loops run at full speed there; not measured on this project's machines).

  Args:
    strategy: a name of :data:`STRATEGIES` or ``"auto"``.
    tau_hat: SGD steps per fitness evaluation.
    devices: devices the candidates are split over.
    backend: JAX backend name; the default backend when None.
  """
  if strategy != "auto":
    return strategy
  if (backend or jax.default_backend()) != "cpu":
    return "map"
  if tau_hat <= CPU_UNROLL_MAX_STEPS:
    return "unroll"
  return "compact" if devices == 1 else "map"


class Population(NamedTuple):
  """The evolving population; a pytree of arrays (``P`` members, ``L`` prunable layers)."""

  a: Array  # float32 [P, L]: deformation scales, > 0
  b: Array  # float32 [P, L]: relative shifts
  loss: Array  # float32 [P]: validation loss after pruning and tau_hat steps (lower is fitter)
  born: Array  # int32 [P]: generation at which each member was added (aging: oldest dies)
  generation: Array  # int32 []: generations completed
  best_a: Array  # float32 [L]: genes of the fittest member ever evaluated (the reference
  best_b: Array  # float32 [L]: returns these; aging may have killed that member)
  best_loss: Array  # float32 []: its loss


def start_population(a: Array, b: Array, loss: Array) -> Population:
  """Generation 0 from ``P`` scored gene sets (``a, b: [P, L]``, ``loss: [P]``)."""
  i = jnp.argmin(loss)
  return Population(a=a, b=b, loss=loss, born=jnp.zeros(loss.shape, jnp.int32),
                    generation=jnp.int32(0), best_a=a[i], best_b=b[i], best_loss=loss[i])


@dataclasses.dataclass(frozen=True)
class SearchData:
  """The batches one fitness evaluation uses; the same for every candidate.

  ``train_images`` uint8 ``[T, B, H, W, C]`` and ``train_labels`` int32 ``[T, B]``:
  one batch per fine-tuning step (``T = tau_hat``); ``val_images`` uint8
  ``[V, B, H, W, C]``, ``val_labels`` int32 ``[V, B]``, ``val_weights`` float32
  ``[V, B]`` (0 for padding).
  """

  train_images: Array
  train_labels: Array
  val_images: Array
  val_labels: Array
  val_weights: Array


jax.tree_util.register_dataclass(
    SearchData, data_fields=["train_images", "train_labels", "val_images", "val_labels",
                             "val_weights"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class FitnessSpec:
  """Everything static about a fitness evaluation (hashable parts only)."""

  model: nn.Module
  structure: ModelStructure
  tx: Any  # optax.GradientTransformation for the tau_hat fine-tuning steps
  preprocess_train: Callable[[Array, Array], Array]  # (key, uint8 images) -> float32
  preprocess_eval: Callable[[Array], Array]  # uint8 images -> float32
  target: float  # fraction of the cost to keep
  metric: str = "flops"
  safeguard: float = 0.1
  min_channels: int = 2
  strategy: str = "map"  # or "auto": search.run_search resolves it (resolve_strategy)
  pad_to: int = 8  # "compact" only: widths rounded up to a multiple of this


def candidate_masks(spec: FitnessSpec, fp: Mapping[str, Array], a: Array, b: Array) -> dict:
  """Masks of one candidate: PIC importance ``a_l * FP + b_l``, pruned to the budget.

  Args:
    spec: the static fitness description.
    fp: ``{layer: float32 [C]}`` filter property of every prunable layer.
    a, b: float32 ``[L]`` genes.

  Returns:
    ``{group: float32 [C]}`` masks.
  """
  importance = pic.pic_importance(fp, a, b, spec.structure)
  return prune_to_budget(importance, spec.structure, spec.target, metric=spec.metric,
                         safeguard=spec.safeguard, min_channels=spec.min_channels).masks


def candidate_loss(spec: FitnessSpec, variables: Mapping[str, Any], fp: Mapping[str, Array],
                   data: SearchData, key: Array, a: Array, b: Array) -> Array:
  """Validation loss of one candidate after ``T`` masked SGD steps (float32 scalar).

  The fine-tuning starts from the pretrained ``variables`` with a fresh optimizer
  state; every candidate sees the same batches and augmentation keys.
  """
  masks = candidate_masks(spec, fp, a, b)
  state = create_train_state({**variables, "masks": masks}, spec.tx)
  keys = jax.random.split(key, data.train_images.shape[0])

  def fine_tune(state, xs):
    images, labels, k = xs
    state, metrics = train_step(state, spec.preprocess_train(k, images), labels,
                                model=spec.model, tx=spec.tx)
    return state, metrics["loss"]

  unroll = spec.strategy == "unroll"
  state, _ = jax.lax.scan(fine_tune, state, (data.train_images, data.train_labels, keys),
                          unroll=unroll)

  def validate(totals, xs):
    images, labels, weights = xs
    out = eval_step(state.variables, spec.preprocess_eval(images), labels, weights,
                    model=spec.model)
    return (totals[0] + out["loss_sum"], totals[1] + out["count"]), None

  (loss_sum, count), _ = jax.lax.scan(
      validate, (jnp.float32(0), jnp.float32(0)),
      (data.val_images, data.val_labels, data.val_weights), unroll=unroll)
  return loss_sum / jnp.maximum(count, 1.0)


def population_loss(spec: FitnessSpec, variables, fp, data: SearchData, key: Array,
                    a: Array, b: Array) -> Array:
  """Losses of ``K`` candidates ``a, b: [K, L] -> [K]``, laid out by ``spec.strategy``
  (jittable, except with ``"compact"``)."""
  if spec.strategy == "compact":
    return compact_population_loss(spec, variables, fp, data, key, a, b)
  one = functools.partial(candidate_loss, spec, variables, fp, data, key)
  if spec.strategy == "vmap":
    return jax.vmap(one)(a, b)
  if spec.strategy == "unroll":
    return jnp.stack([one(a[i], b[i]) for i in range(a.shape[0])])
  return jax.lax.map(lambda ab: one(*ab), (a, b))


def compact_population_loss(spec: FitnessSpec, variables, fp, data: SearchData, key: Array,
                            a: Array, b: Array) -> Array:
  """Losses ``[K]`` of ``K`` candidates ``a, b: [K, L]``, each at its pruned size.

  The same fitness as :func:`candidate_loss` (same batches, keys and steps) on
  ``compact(..., pad_to=spec.pad_to)`` of each candidate: the padding channels
  stay masked with zero kernels, so the loss equals the masked one's up to float
  rounding. The ``tau_hat`` steps run from Python, one jitted step each (on
  XLA:CPU convolutions inside a ``scan`` run far slower, see the module doc);
  programs are compiled once per distinct set of padded widths
  (:func:`_compact_programs`); option-A shortcut maps are traced arguments, so
  they never cause a compile.
  """
  masks = jax.device_get(_masks_program(spec)(fp, a, b))
  keys = jax.random.split(key, data.train_images.shape[0])
  losses = []
  for i in range(a.shape[0]):
    small, small_vars = compact(spec.model, {**variables, "masks": {g: m[i] for g, m in
                                                                   masks.items()}},
                                spec.structure, pad_to=spec.pad_to)
    maps = getattr(small, "shortcut_maps", None)
    step, evaluate = _compact_programs(spec, small.clone(shortcut_maps=None) if maps else small)
    maps = tuple(np.asarray(m, np.int32) for m in maps or ())
    state = create_train_state(small_vars, spec.tx)
    for t in range(keys.shape[0]):
      state = step(state, maps, keys[t], data.train_images[t], data.train_labels[t])
    loss_sum, count = evaluate(state.variables, maps, data.val_images, data.val_labels,
                               data.val_weights)
    losses.append(loss_sum / jnp.maximum(count, 1.0))
  return jnp.stack(losses)


@functools.lru_cache(maxsize=8)
def _masks_program(spec: FitnessSpec) -> Callable:
  """Jitted ``(fp, a [K, L], b [K, L]) -> {group: [K, C]}`` masks of ``K`` candidates."""
  return jax.jit(jax.vmap(functools.partial(candidate_masks, spec), in_axes=(None, 0, 0)))


@functools.lru_cache(maxsize=128)
def _compact_programs(spec: FitnessSpec, model: nn.Module) -> tuple[Callable, Callable]:
  """The jitted fine-tuning step and validation of one compacted ``model`` (its
  option-A shortcut maps, if any, passed as int32 arrays): ``step(state, maps, key,
  images, labels) -> state`` and ``evaluate(variables, maps, images [V, B, ...],
  labels, weights) -> (loss_sum, count)``. Cached by ``model``, whose static fields
  are the padded widths."""
  with_maps = lambda maps: model.clone(shortcut_maps=maps) if maps else model

  def step(state, maps, key, images, labels):
    return train_step(state, spec.preprocess_train(key, images), labels,
                      model=with_maps(maps), tx=spec.tx)[0]

  def evaluate(variables, maps, images, labels, weights):
    def one(totals, xs):
      out = eval_step(variables, spec.preprocess_eval(xs[0]), xs[1], xs[2],
                      model=with_maps(maps))
      return (totals[0] + out["loss_sum"], totals[1] + out["count"]), None
    return jax.lax.scan(one, (jnp.float32(0), jnp.float32(0)), (images, labels, weights),
                        unroll=True)[0]

  # as the library trains: the step with its compile options, evaluation with XLA's
  return compile_options.jit(step), jax.jit(evaluate)


def sharded_population_loss(spec: FitnessSpec, mesh: Mesh | None) -> Callable:
  """:func:`population_loss` with the candidate axis split over ``mesh``'s
  ``population`` axis (each device evaluates its share); plain when ``mesh`` is None."""
  fn = functools.partial(population_loss, spec)
  if spec.strategy == "compact" and mesh is not None and mesh.size > 1:
    raise UserError("--strategy compact evaluates candidates one by one on one device; "
                    "use map, unroll or vmap to split them over devices")
  if mesh is None or mesh.size == 1:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(), P(), P(), P("population"),
                                                P("population")),
                       out_specs=P("population"), check_vma=False)


def tournament(key: Array, loss: Array, sample: int, replace: bool = True) -> Array:
  """Index of the fittest of ``sample`` members drawn at random (int32 []).

  ``replace=True`` draws them with replacement, as the reference
  (``random.sample`` per draw); ``False`` draws ``sample`` distinct members.
  """
  members = jax.random.choice(key, loss.shape[0], (sample,), replace=replace)
  return members[jnp.argmin(loss[members])]


def initial_population(key: Array, fp: Mapping[str, Array], structure: ModelStructure,
                       size: int, identity: bool = True) -> tuple[Array, Array]:
  """``size`` random gene sets ``(a, b)``, each ``[size, L]`` (DESIGN 4 initialization).

  ``identity=True`` makes member 0 the identity genes ``a = 1, b = 0`` (the plain
  criterion), as the reference seeds its population.
  """
  a, b = jax.vmap(lambda k: pic.init_genes(k, fp, structure))(jax.random.split(key, size))
  if identity:
    a, b = a.at[0].set(1.0), b.at[0].set(0.0)
  return a, b


def propose(population: Population, key: Array, fp_std: Array, *, sample: int,
            children: int, generations: int, mutation_rate: float,
            replace: bool = True) -> tuple[Array, Array]:
  """``children`` new gene sets ``(a, b)``, each ``[children, L]``: each is a mutation
  of the winner of a tournament of ``sample`` members (DESIGN 4); ``replace``: draw
  tournament members and mutated layers with replacement (the reference)."""
  k_select, k_mutate = jax.random.split(key)
  parents = jax.vmap(lambda k: tournament(k, population.loss, sample, replace))(
      jax.random.split(k_select, children))
  step = pic.mutation_step(population.generation, generations)
  return jax.vmap(lambda k, a, b: pic.mutate(k, a, b, fp_std, step, mutation_rate, replace))(
      jax.random.split(k_mutate, children), population.a[parents], population.b[parents])


def replace_oldest(population: Population, a: Array, b: Array, loss: Array) -> Population:
  """Aging: the ``K`` oldest members die and the children ``(a, b, loss)`` (leading
  axis ``K``) take their places; the generation counter advances and the best-ever
  genes are updated (a tie keeps the earlier one)."""
  oldest = jnp.argsort(population.born, stable=True)[:loss.shape[0]]
  i = jnp.argmin(loss)
  better = loss[i] < population.best_loss
  return Population(
      a=population.a.at[oldest].set(a), b=population.b.at[oldest].set(b),
      loss=population.loss.at[oldest].set(loss),
      born=population.born.at[oldest].set(population.generation + 1),
      generation=population.generation + 1,
      best_a=jnp.where(better, a[i], population.best_a),
      best_b=jnp.where(better, b[i], population.best_b),
      best_loss=jnp.where(better, loss[i], population.best_loss))


def evolve(population: Population, key: Array, variables, fp, data: SearchData, *,
           evaluate: Callable, fp_std: Array, sample: int, children: int,
           generations: int, mutation_rate: float, replace: bool = True) -> Population:
  """One generation of regularized evolution: ``children`` tournaments, mutations
  and evaluations; the ``children`` oldest members die.

  Args:
    population: the current :class:`Population` (``P`` members).
    key: PRNG key of this generation.
    variables: pretrained model variables (the fine-tuning start point).
    fp: ``{layer: float32 [C]}`` filter property.
    data: this generation's :class:`SearchData`.
    evaluate: ``(variables, fp, data, key, a[K, L], b[K, L]) -> loss [K]``.
    fp_std: float32 ``[L]``, ``std(FP_l)``, the scale of ``b`` mutations.
    sample, children, generations, mutation_rate, replace: static search settings
      (``replace``: see :func:`propose`).

  Returns:
    The next population (same shapes).
  """
  k_propose, k_eval = jax.random.split(key)
  a, b = propose(population, k_propose, fp_std, sample=sample, children=children,
                 generations=generations, mutation_rate=mutation_rate, replace=replace)
  return replace_oldest(population, a, b, evaluate(variables, fp, data, k_eval, a, b))


def best(population: Population, ever: bool = True) -> tuple[Array, Array, Array]:
  """Genes ``(a [L], b [L])`` and loss of the fittest member: of every member ever
  evaluated (``ever=True``, the reference) or of the final population."""
  if ever:
    return population.best_a, population.best_b, population.best_loss
  i = jnp.argmin(population.loss)
  return population.a[i], population.b[i], population.loss[i]


def check_settings(population: int, sample: int, children: int, num_devices: int) -> None:
  """UserError for settings the search cannot run with."""
  if not 1 <= sample <= population:
    raise UserError(f"--sample={sample} must lie in 1..population ({population})")
  if not 1 <= children <= population or population % children:
    raise UserError(f"--children={children} must divide --population={population} "
                    f"(the initial population is evaluated {children} at a time)")
  if children % num_devices:
    raise UserError(f"--children={children} does not divide across {num_devices} devices: "
                    f"use a multiple of {num_devices}")


def losses_history(history: list[Population]) -> np.ndarray:
  """Best loss after each generation, float64 ``[G]``, from saved populations."""
  return np.array([float(jnp.min(p.loss)) for p in history])
