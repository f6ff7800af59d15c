"""MeZO: zeroth-order SGD at inference memory (Malladi et al. 2023).

One step estimates the directional derivative of the loss along a random Gaussian
direction ``z`` from two forward passes (SPSA), and moves along ``z``:

    theta <- theta + eps z;  L+ = L(theta)
    theta <- theta - 2 eps z; L- = L(theta)
    theta <- theta + eps z                      (back to theta, up to rounding)
    g = (L+ - L-) / (2 eps)                     (the projected gradient, a scalar)
    theta <- theta - lr g z

``z`` is never stored: every time it is needed it is drawn again from the same key.
Leaf ``i`` of ``z`` for key ``k`` is drawn in chunks of rows: the leaf is viewed as
``[rows, cols]`` (``rows = shape[0]``), cut into blocks of ``R = max(1, CHUNK //
cols)`` rows (the last one shorter), and block ``c`` is ``normal(fold_in(fold_in(k,
i), c), [R, cols])``; a leaf of at most ``CHUNK`` elements is one block, ``normal(
fold_in(fold_in(k, i), 0), shape)``. Each block is added into the parameters with a
``dynamic_update_slice`` inside a ``lax.fori_loop``, which XLA performs in place.

Why chunks: XLA did not update a whole leaf in place from a whole-leaf draw.
Measured with ``memory_analysis()`` (jax 0.10.2, XLA:CPU) for a donated ``[30522,
384]`` float32 leaf (MiniLM's word embeddings, 44.7 MiB): ``x + 1e-3 * normal(k,
x.shape)`` needs 178.8 MiB of temporaries with threefry keys (its counters and bits
are materialized); with ``rbg`` keys one such update is in place, but two in a row
already need a leaf-sized temporary (the draw's index mapping keeps XLA from
sharing the buffer) and the SPSA sequence needs two. Chunked, the temporaries are a
few chunks whatever the leaf, with any key type (the default threefry included, so
draws are also the same under ``vmap`` and across backends).

The two losses are computed inside the ``lax.scan`` that carries ``theta`` through
the two perturbations (read outside it, XLA copied ``theta`` before the next
in-place update). The whole step for that leaf then needs 6.8 MiB of temporaries
(n = 1; 10.3 MiB for n = 4) instead of 92 MiB. So besides the parameters (donated:
updated in place) the step needs a forward pass's activations and a few chunks: the
memory of inference.

n-SPSA (``n > 1``): ``n`` directions ``z_j`` from keys ``k_j = fold_in(zkey, j)``,
each with its own ``g_j`` measured at the same ``theta``, then ``theta <- theta -
(lr / n) sum_j g_j z_j`` (the average of the ``n`` estimates).

Keys: ``zkey, lkey = jax.random.split(key)``, ``k_j = fold_in(zkey, j)``; ``lkey`` is
the loss's own key (dropout), the same for ``L+`` and ``L-`` so both see the same
noise.

Which parameters move is a :class:`~picpq_jax.finetune.peft.Method`'s choice:
``full()`` perturbs every parameter (the paper's MeZO), ``lora.method(...)`` only
the adapters (MeZO + LoRA, also in the paper), ``prompt(...)`` only the soft prompt.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from picpq_jax.errors import UserError
from picpq_jax.finetune.peft import Method, full, loss_of

Array = jax.Array


CHUNK = 1 << 18  # elements of z drawn at once (1 MiB of float32)


def _perturb_leaf(x: Array, key: Array, scale: Array, chunk: int) -> Array:
  """``x + scale * z`` for one leaf, drawn and added block by block in place."""
  scale = jnp.asarray(scale, x.dtype)
  if x.size <= chunk or x.ndim == 0:
    return (x + scale * jax.random.normal(jax.random.fold_in(key, 0), x.shape, x.dtype)
            ).astype(x.dtype)
  rows = x.shape[0]
  cols = x.size // rows
  per = max(1, chunk // cols)
  count, rest = divmod(rows, per)
  y = x.reshape(rows, cols)

  def add(y, c, start, size):
    part = lax.dynamic_slice_in_dim(y, start, size, 0)
    z = jax.random.normal(jax.random.fold_in(key, c), (size, cols), x.dtype)
    return lax.dynamic_update_slice_in_dim(y, (part + scale * z).astype(x.dtype), start, 0)

  y = lax.fori_loop(0, count, lambda c, y: add(y, c, c * per, per), y)
  if rest:
    y = add(y, count, count * per, rest)
  return y.reshape(x.shape)


def perturb(tree: Any, key: Array, scale: Array | float, chunk: int = CHUNK) -> Any:
  """``tree + scale * z(key)``, leaf by leaf and block by block (see the module docs).

  Args:
    tree: float pytree (the trainable parameters).
    key: the direction's key.
    scale: float scalar (may be traced).
    chunk: static; elements of ``z`` drawn at once (part of ``z``'s definition).

  Returns:
    Pytree of ``tree``'s structure and dtypes.
  """
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([_perturb_leaf(x, jax.random.fold_in(key, i), scale, chunk)
                            for i, x in enumerate(leaves)])


def direction(key: Array, like: Any, chunk: int = CHUNK) -> Any:
  """The direction ``z`` for ``key``: standard normal leaves shaped like ``like``
  (``perturb(zeros, key, 1)``). For inspection and tests; the step never stores a
  whole ``z``."""
  return perturb(jax.tree.map(jnp.zeros_like, like), key, 1.0, chunk)


def projected_gradient(loss: Callable[[Any], Array], theta: Any, key: Array, eps: float,
                       chunk: int = CHUNK) -> tuple[Array, Any, Array]:
  """One SPSA estimate, perturbing ``theta`` in place and restoring it.

  Args:
    loss: ``theta -> float32 scalar``.
    theta: trainable pytree.
    key: the direction's key.
    eps: perturbation size.
    chunk: as in :func:`perturb`.

  Returns:
    ``(g, theta, mean_loss)``: the projected gradient ``(L+ - L-) / (2 eps)`` (float32
    scalar), ``theta`` after ``+eps z, -2eps z, +eps z`` (equal to the input up to
    float rounding, as in the reference implementation), and ``(L+ + L-) / 2``.
  """
  def phase(theta, scale):  # +eps z, then L+; -2 eps z, then L-
    theta = perturb(theta, key, scale, chunk)
    return theta, loss(theta).astype(jnp.float32)

  # The losses are read inside the loop that owns ``theta``: read outside, the
  # buffer feeding the next in-place update would be copied first (XLA's copy
  # insertion), one more copy of the parameters.
  theta, (plus, minus) = lax.scan(phase, theta, jnp.array([eps, -2.0 * eps], jnp.float32))
  theta = perturb(theta, key, eps, chunk)
  return (plus - minus) / (2.0 * eps), theta, 0.5 * (plus + minus)


class MezoStep(NamedTuple):
  """What :func:`make_step` returns: ``step(frozen, trainable, batch, key, lr) ->
  (trainable, info)`` with ``info = {"loss": float32 [], "projected_grad": float32
  [n]}``."""

  step: Callable[..., tuple[Any, dict[str, Array]]]
  eps: float
  n: int


def make_step(loss_fn: Callable, method: Method | None = None, *, eps: float = 1e-3,
              n: int = 1, chunk: int = CHUNK, jit: bool = True,
              donate: bool = True) -> MezoStep:
  """A MeZO step (n-SPSA with ``n`` directions) over a method's trainable part.

  Args:
    loss_fn: ``loss_fn(params, batch, key, **extras) -> float32 scalar`` (as in
      :func:`~picpq_jax.finetune.peft.make_train_step`, without aux).
    method: which part moves; ``None`` is :func:`~picpq_jax.finetune.peft.full`.
    eps: perturbation scale (the paper: 1e-3).
    n: directions per step, at least 1.
    chunk: elements of ``z`` drawn at once (see the module docs): the temporaries
      are a few chunks (about 6 MiB at the default on XLA:CPU).
    jit: compile the step.
    donate: donate ``trainable`` (updated in place: memory stays at inference level).

  Returns:
    :class:`MezoStep`; ``step(frozen, trainable, batch, key, lr)`` with ``lr`` a
    float scalar (traced: a schedule never recompiles). ``info["loss"]`` is the mean
    of ``(L+ + L-) / 2`` over the directions, an estimate of the loss before the step.
  """
  if n < 1:
    raise UserError(f"MeZO needs at least one perturbation per step, got n={n}")
  if chunk < 1:
    raise UserError(f"MeZO chunk must be at least 1 element, got {chunk}")
  if not eps > 0:
    raise UserError(f"MeZO eps must be positive, got {eps}")
  loss = loss_of(loss_fn, method or full())

  def step(frozen, trainable, batch, key, lr):
    zkey, lkey = jax.random.split(key)
    at = lambda t: loss(t, frozen, batch, lkey)  # noqa: E731

    def estimate(j, carry):
      theta, grads, total = carry
      g, theta, mean = projected_gradient(at, theta, jax.random.fold_in(zkey, j), eps, chunk)
      return theta, grads.at[j].set(g), total + mean

    theta, grads, total = lax.fori_loop(
        0, n, estimate, (trainable, jnp.zeros((n,), jnp.float32), jnp.float32(0)))
    theta = lax.fori_loop(
        0, n, lambda j, t: perturb(t, jax.random.fold_in(zkey, j), -lr * grads[j] / n, chunk),
        theta)
    return theta, {"loss": total / n, "projected_grad": grads}

  if jit:
    step = jax.jit(step, donate_argnums=(1,) if donate else ())
  return MezoStep(step, eps, n)
