"""Fine-tuning methods as pure transforms over Flax param pytrees, and one train step.

A fine-tuning method says which part of a model learns and how the model's inputs
are rebuilt from that part. It is a :class:`Method`, a pair of pure functions in
the manner of an Optax ``GradientTransformation``:

* ``init(key, params) -> (frozen, trainable)``: splits (or extends) a pretrained
  ``params`` pytree into a frozen part that is never differentiated and a trainable
  pytree (a subset of ``params``, new LoRA adapters, a soft prompt...).
* ``combine(frozen, trainable, key) -> (params, extras)``: what the model runs
  with: the ``params`` for ``model.apply`` and a dict of extra keyword inputs of the
  model (``{}`` for every method but prompt tuning, whose ``extras`` is
  ``{"prompt": [P, hidden]}``). ``key`` draws method-level randomness (LoRA
  dropout) and is ``None`` at evaluation.

Methods here: :func:`full` (everything trains; ``frozen`` is empty), :func:`bitfit`
(biases only, Ben Zaken et al. 2022), :func:`prompt` (a learned soft prompt,
Lester et al. 2021) and the combinator :func:`train_also` (any method plus some
modules trained in full, e.g. a new classifier head). LoRA and quantized-base LoRA
are in :mod:`picpq_jax.finetune.lora` and :mod:`picpq_jax.finetune.qlora`; MeZO
(:mod:`picpq_jax.finetune.mezo`) and the federated rounds take the same ``Method``.

:func:`make_train_step` builds a jitted first-order step that differentiates only
the trainable part: no gradient of the frozen base is formed and the optimizer holds
state only for the trainable leaves, which is where PEFT saves memory. For a
first-order method that must keep the full tree, :func:`bitfit_mask` is the same
choice as a boolean pytree for ``optax.masked`` / ``optax.multi_transform``.

Rematerialization. ``make_train_step(remat=...)`` wraps the whole loss in one
``jax.checkpoint``; that alone cannot lower the peak (the backward pass recomputes
and holds every residual at once); with a policy it keeps only some residuals.
Per-block remat belongs to the model (``BertClassifier(remat=True)``). Measured with
``memory_analysis()`` on XLA:CPU (jax 0.10.2): neither form lowered a step's
temporaries (a 6-block, 128-wide BERT, batch 16 x 64 tokens: 106.5 MiB without
remat, with whole-loss remat and with per-block remat alike; 118.5 MiB with the
``dots_with_no_batch_dims_saveable`` policy): the CPU compiler schedules the
recomputation early. Whether it pays on GPU/TPU has to be measured there.

Paths. A leaf's path is its dict keys joined by ``/`` (``layer_0/attention/query/
kernel``); patterns are Python regular expressions matched with ``re.search``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.core import unfreeze

from picpq_jax.errors import UserError
from picpq_jax.models.structure import param_count

Array = jax.Array
Params = Any  # nested dict of arrays (Flax ``params``)
Frozen = Any
Trainable = Any
SEP = "/"


class Method(NamedTuple):
  """A fine-tuning method: ``init`` splits params, ``combine`` rebuilds the model's inputs."""

  name: str
  init: Callable[[Array, Params], tuple[Frozen, Trainable]]  # (key, params) -> parts
  combine: Callable[[Frozen, Trainable, Array | None], tuple[Params, dict[str, Any]]]


# ----------------------------------------------------------------------------- paths

def flatten(tree: Params) -> dict[str, Any]:
  """``{"a/b/kernel": leaf}`` of a nested dict (``FrozenDict`` too); other pytrees
  (e.g. a quantized kernel) stay whole leaves."""
  return traverse_util.flatten_dict(unfreeze(tree), sep=SEP)


def unflatten(flat: dict[str, Any]) -> Params:
  """Inverse of :func:`flatten`."""
  return traverse_util.unflatten_dict(flat, sep=SEP)


def select(candidates: list[str], pattern: str, what: str = "parameters") -> list[str]:
  """The ``candidates`` (paths) that ``pattern`` matches (``re.search``), in order.

  Raises:
    UserError: the pattern is not a valid regex, or matches none of the candidates
      (the message lists them).
  """
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise UserError(f"{what} pattern {pattern!r} is not a regular expression ({e}): "
                    "fix the pattern") from e
  found = [p for p in candidates if regex.search(p)]
  if not found:
    shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
    raise UserError(f"{what} pattern {pattern!r} matches none of the model's paths: "
                    f"pick from {shown}")
  return found


def matching(params: Params, pattern: str, what: str = "parameters",
             where: Callable[[str, Any], bool] = lambda path, leaf: True) -> list[str]:
  """Leaf paths of ``params`` (those with ``where(path, leaf)``) that ``pattern``
  matches; :func:`select` over them."""
  return select([p for p, leaf in flatten(params).items() if where(p, leaf)], pattern, what)


def partition(params: Params, mask: Any) -> tuple[Params, Params]:
  """Splits ``params`` into ``(frozen, trainable)`` by a boolean pytree ``mask``.

  Args:
    params: nested dict of arrays.
    mask: bools with the structure of ``params`` (True = trainable), e.g.
      :func:`bitfit_mask`.

  Returns:
    Two nested dicts holding the False and the True leaves. The trainable leaves are
    copies, so a train step that donates them leaves ``params`` intact; the frozen
    leaves are ``params``'s own arrays.
  """
  flat, keep = flatten(params), flatten(mask)
  frozen = {k: v for k, v in flat.items() if not keep[k]}
  return unflatten(frozen), unflatten({k: jnp.copy(v) for k, v in flat.items() if keep[k]})


def merge(frozen: Params, trainable: Params) -> Params:
  """Inverse of :func:`partition`: one nested dict with the leaves of both."""
  return unflatten({**flatten(frozen), **flatten(trainable)})


def path_mask(params: Params, keep: Callable[[str], bool]) -> Params:
  """Boolean pytree of ``params``'s structure: ``keep(path)`` per leaf."""
  return unflatten({p: bool(keep(p)) for p in flatten(params)})


def trainable_count(trainable: Trainable) -> int:
  """Number of trainable scalars (all leaves of the trainable part)."""
  return param_count(trainable)


# ----------------------------------------------------------------------------- methods

def full() -> Method:
  """Full fine-tuning: every parameter trains; ``frozen`` is ``{}``, ``trainable`` a
  copy of ``params`` (drop ``params`` afterwards to hold one copy)."""
  return Method("full", lambda key, params: ({}, jax.tree.map(jnp.copy, params)),
                lambda frozen, trainable, key=None: (merge(frozen, trainable), {}))


def bitfit_mask(params: Params, also: str | None = None) -> Params:
  """BitFit's choice as a boolean pytree: every leaf named ``bias`` (Dense and
  LayerNorm biases alike), plus every leaf whose path matches ``also`` (e.g.
  ``"classifier"``, the new head). Usable with ``optax.masked`` as it is."""
  if also:
    matching(params, also, "--train-also")  # a clear error before compiling it
  regex = re.compile(also) if also else None
  return path_mask(params, lambda p: p.rsplit(SEP, 1)[-1] == "bias"
                   or bool(regex and regex.search(p)))


def bitfit(also: str | None = None) -> Method:
  """BitFit (Ben Zaken et al. 2022): biases train, all else is frozen.

  Args:
    also: optional pattern of extra leaves that train in full (a classifier head).
  """
  return Method("bitfit", lambda key, params: partition(params, bitfit_mask(params, also)),
                lambda frozen, trainable, key=None: (merge(frozen, trainable), {}))


def _embedding_table(params: Params, embedding: str) -> Array:
  paths = matching(params, embedding, "embedding",
                   lambda p, leaf: getattr(leaf, "ndim", 0) == 2)
  if len(paths) != 1:
    raise UserError(f"embedding pattern {embedding!r} matches {len(paths)} tables "
                    f"({', '.join(paths)}): make it match exactly one")
  return flatten(params)[paths[0]]


def prompt_init(key: Array, length: int, hidden: int, scale: float = 0.5,
                dtype: Any = jnp.float32) -> Array:
  """A random soft prompt, uniform in ``[-scale, scale]`` (Lester et al. 2021's random
  initialization): ``[length, hidden]`` of ``dtype``."""
  if length < 1:
    raise UserError(f"prompt length {length} must be at least 1")
  return jax.random.uniform(key, (length, hidden), dtype, -scale, scale)


def prompt_from_tokens(params: Params, ids: Any, embedding: str = "word_embeddings") -> Array:
  """A soft prompt initialized from the token embeddings of ``ids`` (the
  vocabulary initialization of Lester et al.): ``table[ids]``, ``[len(ids), hidden]``.

  Args:
    params: the pretrained params.
    ids: int token ids ``[P]`` (host values: a list or numpy array).
    embedding: pattern matching exactly one 2-D leaf, the ``[vocab, hidden]`` table.
  """
  table = _embedding_table(params, embedding)
  ids = np.asarray(ids, np.int64).reshape(-1)
  if ids.size == 0 or ids.max() >= table.shape[0] or ids.min() < 0:
    raise UserError(f"prompt token ids must be non-empty and in [0, {table.shape[0]}): "
                    "tokenize the prompt text with the model's tokenizer")
  return table[jnp.asarray(ids, jnp.int32)]


def prompt(length: int = 20, init_ids: Any = None, embedding: str = "word_embeddings",
           scale: float = 0.5) -> Method:
  """Prompt tuning: a learned soft prompt ``[P, hidden]`` fed to the model as
  ``extras["prompt"]``; ``params`` stay frozen whole.

  Args:
    length: ``P`` when ``init_ids`` is None (random init, hidden size read from the
      embedding table).
    init_ids: token ids to initialize from (:func:`prompt_from_tokens`); then
      ``P = len(init_ids)``.
    embedding: pattern of the ``[vocab, hidden]`` embedding table.
    scale: half-width of the random uniform init.
  """
  def init(key, params):
    if init_ids is not None:
      return params, prompt_from_tokens(params, init_ids, embedding)
    table = _embedding_table(params, embedding)
    return params, prompt_init(key, length, table.shape[1], scale, table.dtype)
  return Method("prompt", init, lambda frozen, soft, key=None: (frozen, {"prompt": soft}))


def only(pattern: str, name: str = "only") -> Method:
  """Only the leaves matching ``pattern`` train (``only("^head/")``: the classifier
  head alone, linear probing), every other leaf is frozen."""
  def init(key, params):
    paths = set(matching(params, pattern, name))
    return partition(params, path_mask(params, lambda p: p in paths))
  return Method(name, init, lambda frozen, trainable, key=None: (merge(frozen, trainable), {}))


def train_also(method: Method, pattern: str | None) -> Method:
  """``method`` plus the leaves matching ``pattern`` trained in full.

  The matching leaves (a classifier head created for the task, say) are taken out of
  ``params`` before ``method.init`` sees them, so LoRA never targets and a quantized
  base never quantizes them. ``trainable`` becomes ``{"method": <method's>,
  "full": <matching leaves>}``. ``pattern=None`` returns ``method`` unchanged.
  """
  if not pattern:
    return method

  def init(key, params):
    paths = set(matching(params, pattern, "--train-also"))
    rest, head = partition(params, path_mask(params, lambda p: p in paths))
    frozen, trainable = method.init(key, rest)
    return frozen, {"method": trainable, "full": head}

  def combine(frozen, trainable, key=None):
    params, extras = method.combine(frozen, trainable["method"], key)
    return merge(params, trainable["full"]), extras

  return Method(method.name, init, combine)


# ----------------------------------------------------------------------------- training

class TrainStep(NamedTuple):
  """What :func:`make_train_step` returns."""

  init: Callable[[Trainable], Any]  # trainable -> optimizer state (trainable leaves only)
  step: Callable[..., tuple[Trainable, Any, Array, Any]]


def loss_of(loss_fn: Callable, method: Method) -> Callable:
  """``f(trainable, frozen, batch, key) -> loss_fn(params, batch, key, **extras)``
  with ``(params, extras) = method.combine(frozen, trainable, k1)``, where ``k1, k2 =
  split(key)`` and ``k2`` goes to ``loss_fn``; ``key=None`` passes ``None`` to both
  (evaluation)."""
  def f(trainable, frozen, batch, key):
    k_method, k_loss = (None, None) if key is None else tuple(jax.random.split(key))
    params, extras = method.combine(frozen, trainable, k_method)
    return loss_fn(params, batch, k_loss, **extras)
  return f


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    method: Method, *, has_aux: bool = False, remat: Any = False,
                    jit: bool = True, donate: bool = True) -> TrainStep:
  """A first-order step that differentiates only the trainable part.

  Args:
    loss_fn: ``loss_fn(params, batch, key, **extras) -> loss`` (float32 scalar), or
      ``(loss, aux)`` with ``has_aux``; ``params`` and ``extras`` come from
      ``method.combine``; ``key`` is for dropout (may be ``None``).
    optimizer: an Optax transformation; its state covers ``trainable`` only.
    method: the :class:`Method`.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    remat: rematerialization of the loss as one ``jax.checkpoint``: ``False``, ``True``
      (save nothing: recompute the forward pass in the backward) or a
      ``jax.checkpoint_policies`` policy (e.g. ``qlora.RECOMPUTE_DEQUANTIZED``).
      Per-layer remat is the model's business (``nn.remat`` on its blocks); see the
      module docs for what was measured.
    jit: compile the step.
    donate: donate ``trainable`` and the optimizer state (updated in place).

  Returns:
    :class:`TrainStep`: ``init(trainable) -> opt_state`` and ``step(frozen,
    trainable, opt_state, batch, key) -> (trainable, opt_state, loss, aux)``
    (``aux`` is ``None`` without ``has_aux``).
  """
  loss = loss_of(loss_fn, method)
  if not has_aux:
    base = loss
    loss = lambda *a: (base(*a), None)  # noqa: E731
  if remat is True:
    loss = jax.checkpoint(loss)
  elif remat:
    loss = jax.checkpoint(loss, policy=remat)

  def step(frozen, trainable, opt_state, batch, key):
    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(trainable, frozen, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value, aux

  if jit:
    step = jax.jit(step, donate_argnums=(1, 2) if donate else ())
  return TrainStep(optimizer.init, step)
