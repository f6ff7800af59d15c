"""MeZO: zeroth-order SGD at inference memory (Malladi et al. 2023).

One step estimates the directional derivative of the loss along a random Gaussian
direction ``z`` from two forward passes (SPSA), and moves along ``z``:

    theta <- theta + eps z;  L+ = L(theta)
    theta <- theta - 2 eps z; L- = L(theta)
    theta <- theta + eps z                      (back to theta, up to rounding)
    g = (L+ - L-) / (2 eps)                     (the projected gradient, a scalar)
    theta <- theta - lr g z

``z`` is never stored: every time it is needed it is drawn again from the same key,
leaf by leaf (``z_leaf_i = normal(fold_in(draw_key(k_j), i), shape, dtype)``), so
besides the parameters the step needs a forward pass's activations: the memory of
inference. The step is one jitted program whose parameter buffers are donated; the
perturbations run inside a ``lax.fori_loop`` whose carry XLA updates in place.

PRNG implementation. Which generator draws ``z`` decides the memory. With JAX's
default threefry, XLA:CPU materializes about three leaf-sized ``uint32`` temporaries
per draw: ``memory_analysis()`` of ``x + 1e-3 * normal(k, x.shape)`` for a donated
``[30522, 384]`` float32 ``x`` (MiniLM's word embeddings, 44.7 MiB) shows 178.8 MiB
of temporaries; with an ``rbg`` key (XLA's ``RngBitGenerator``) it shows 0 and the
update happens in place (jax 0.10.2). So directions are drawn from an ``rbg`` key
seeded by 128 bits of the given key (:func:`draw_key`); ``prng_impl=None`` keeps the
caller's key type. Two caveats of ``rbg``: its bits may change across XLA versions
and backends (same machine and version: same bits, which is what the replay needs),
and a draw under ``vmap`` differs from the same draw unbatched, so a MeZO step must
not be ``vmap``-ed across clients whose directions are replayed elsewhere (the
federated round loops over them instead).

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


IMPLS = (None, "rbg")


def draw_key(key: Array, impl: str | None = "rbg") -> Array:
  """The key a direction is drawn from: ``key`` itself (``impl=None``) or an ``impl``
  key made of 128 bits of it, ``wrap_key_data(bits(key, (4,), uint32), impl)``."""
  if impl is None:
    return key
  if impl not in IMPLS:
    raise UserError(f"PRNG implementation {impl!r} for perturbations is unknown: use one of "
                    f"{IMPLS}")
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=impl)


def direction(key: Array, like: Any, impl: str | None = "rbg") -> Any:
  """The direction ``z`` for ``key``: standard normal leaves shaped like ``like``.

  Leaf ``i`` (in ``jax.tree.leaves`` order) is ``normal(fold_in(draw_key(key, impl),
  i), shape, dtype)``. Provided for inspection and tests; the step never stores a
  whole ``z``.
  """
  base = draw_key(key, impl)
  leaves, treedef = jax.tree.flatten(like)
  return treedef.unflatten([jax.random.normal(jax.random.fold_in(base, i), x.shape, x.dtype)
                            for i, x in enumerate(leaves)])


def perturb(tree: Any, key: Array, scale: Array | float, impl: str | None = "rbg") -> Any:
  """``tree + scale * z(key)``, leaf by leaf, each ``z`` leaf drawn and dropped at once.

  Args:
    tree: float pytree (the trainable parameters).
    key: the direction's key (see :func:`direction`).
    scale: float scalar (may be traced).
    impl: PRNG implementation the directions are drawn with (see the module docs).

  Returns:
    Pytree of ``tree``'s structure and dtypes.
  """
  base = draw_key(key, impl)
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for i, x in enumerate(leaves):
    z = jax.random.normal(jax.random.fold_in(base, i), x.shape, x.dtype)
    out.append((x + jnp.asarray(scale, x.dtype) * z).astype(x.dtype))
  return treedef.unflatten(out)


def projected_gradient(loss: Callable[[Any], Array], theta: Any, key: Array, eps: float,
                       impl: str | None = "rbg") -> tuple[Array, Any, Array]:
  """One SPSA estimate, perturbing ``theta`` in place and restoring it.

  Args:
    loss: ``theta -> float32 scalar``.
    theta: trainable pytree.
    key: the direction's key.
    eps: perturbation size.
    impl: PRNG implementation of the direction.

  Returns:
    ``(g, theta, mean_loss)``: the projected gradient ``(L+ - L-) / (2 eps)`` (float32
    scalar), ``theta`` after ``+eps z, -2eps z, +eps z`` (equal to the input up to
    float rounding, as in the reference implementation), and ``(L+ + L-) / 2``.
  """
  theta = perturb(theta, key, eps, impl)
  plus = loss(theta)
  theta = perturb(theta, key, -2.0 * eps, impl)
  minus = loss(theta)
  theta = perturb(theta, key, eps, impl)
  g = (plus - minus).astype(jnp.float32) / (2.0 * eps)
  return g, theta, 0.5 * (plus + minus).astype(jnp.float32)


class MezoStep(NamedTuple):
  """What :func:`make_step` returns: ``step(frozen, trainable, batch, key, lr) ->
  (trainable, info)`` with ``info = {"loss": float32 [], "projected_grad": float32
  [n]}``."""

  step: Callable[..., tuple[Any, dict[str, Array]]]
  eps: float
  n: int


def make_step(loss_fn: Callable, method: Method | None = None, *, eps: float = 1e-3,
              n: int = 1, prng_impl: str | None = "rbg", jit: bool = True,
              donate: bool = True) -> MezoStep:
  """A MeZO step (n-SPSA with ``n`` directions) over a method's trainable part.

  Args:
    loss_fn: ``loss_fn(params, batch, key, **extras) -> float32 scalar`` (as in
      :func:`~picpq_jax.finetune.peft.make_train_step`, without aux).
    method: which part moves; ``None`` is :func:`~picpq_jax.finetune.peft.full`.
    eps: perturbation scale (the paper: 1e-3).
    n: directions per step, at least 1.
    prng_impl: ``"rbg"`` (default) or ``None`` (the caller's key type, threefry by
      default); see the module docs for the memory this decides.
    jit: compile the step.
    donate: donate ``trainable`` (updated in place: memory stays at inference level).

  Returns:
    :class:`MezoStep`; ``step(frozen, trainable, batch, key, lr)`` with ``lr`` a
    float scalar (traced: a schedule never recompiles). ``info["loss"]`` is the mean
    of ``(L+ + L-) / 2`` over the directions, an estimate of the loss before the step.
  """
  if n < 1:
    raise UserError(f"MeZO needs at least one perturbation per step, got n={n}")
  if not eps > 0:
    raise UserError(f"MeZO eps must be positive, got {eps}")
  draw_key(jax.random.key(0), prng_impl)  # an unknown implementation fails here
  loss = loss_of(loss_fn, method or full())

  def step(frozen, trainable, batch, key, lr):
    zkey, lkey = jax.random.split(key)
    at = lambda t: loss(t, frozen, batch, lkey)  # noqa: E731

    def estimate(j, carry):
      theta, grads, total = carry
      g, theta, mean = projected_gradient(at, theta, jax.random.fold_in(zkey, j), eps,
                                          prng_impl)
      return theta, grads.at[j].set(g), total + mean

    theta, grads, total = lax.fori_loop(
        0, n, estimate, (trainable, jnp.zeros((n,), jnp.float32), jnp.float32(0)))
    theta = lax.fori_loop(
        0, n, lambda j, t: perturb(t, jax.random.fold_in(zkey, j), -lr * grads[j] / n,
                                   prng_impl), theta)
    return theta, {"loss": total / n, "projected_grad": grads}

  if jit:
    step = jax.jit(step, donate_argnums=(1,) if donate else ())
  return MezoStep(step, eps, n)
