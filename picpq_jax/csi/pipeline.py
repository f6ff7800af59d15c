"""The BTS decoder as a GPipe-like pipeline over a ``stages`` mesh axis.

The decoder is cut into ``S`` consecutive stages (:func:`~picpq_jax.csi.models.decoder_stages`);
device ``s`` of the ``stages`` axis runs stage ``s``. The micro-batches are the UEs'
codeword batches (``n = U`` of them, each ``[B, M]``): at tick ``t`` stage ``s``
works on micro-batch ``t - s`` (when ``0 <= t - s < n``) and hands its output to
stage ``s + 1`` with ``ppermute``; after ``n + S - 1`` ticks the last stage has every
reconstruction, and the loss is taken there. The backward pass is the forward's
autodiff: ``ppermute`` transposes to a ``ppermute`` the other way, so gradients flow
from the last stage to the first in the mirrored schedule (GPipe: all forwards,
then all backwards, ``(S - 1) / (n + S - 1)`` of the ticks idle per stage).

Batch norm sees one micro-batch at a time (as in GPipe): each micro-batch is
normalized with its own statistics, and a stage's running statistics are updated
micro-batch after micro-batch in order. :func:`bts_loss_and_grads` with ``S = 1``
is exactly that computation without a pipeline (the reference the tests compare).

Every device holds all of the decoder's variables (replicated) and selects its
stage's with ``lax.switch`` on its ``stages`` index, so one program serves every
stage; gradients and statistics of a stage are nonzero only on its device and
are combined with ``psum`` over ``stages``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from picpq_jax.csi.models import decoder_stages, stage_variables

Array = jax.Array
STAGES = "stages"


def mse(x_hat: Array, x: Array) -> Array:
  """Mean squared error over every entry (CsiNet's training loss); float32 scalar."""
  return jnp.mean(jnp.square(x_hat.astype(jnp.float32) - x.astype(jnp.float32)))


def _stage_fns(decoder: nn.Module, spans: tuple[tuple[int, int], ...]) -> list:
  """One ``f(params, stats, consts, codewords, h) -> (out [B, 32, 32, 2], stats)`` per stage;
  stage 0 reads ``codewords [B, M]``, the others ``h``. ``stats`` is the whole
  decoder's ``batch_stats``; a stage replaces only its own pieces' entries."""
  def make(k, span):
    stage = decoder.clone(parent=None, span=span)

    def f(params, stats, consts, codewords, h):
      variables = stage_variables({**consts, "params": params, "batch_stats": stats}, decoder,
                                  span)
      out, updates = stage.apply(variables, codewords if k == 0 else h, train=True,
                                 mutable=["batch_stats"])
      return out, {**stats, **updates.get("batch_stats", {})}
    return f
  return [make(k, span) for k, span in enumerate(spans)]


def _owner(decoder: nn.Module, spans: tuple[tuple[int, int], ...]) -> dict[str, int]:
  """``{piece name: stage index}``."""
  pieces = decoder.pieces()
  return {pieces[i]: s for s, (a, b) in enumerate(spans) for i in range(a, b)}


def _pipelined_loss(decoder: nn.Module, num_stages: int, params: Any, codewords: Array,
                    targets: Array, stats: Any, consts: dict) -> tuple[Array, Any]:
  """Mean over micro-batches of the reconstruction MSE, run as the GPipe schedule.

  ``codewords [n, B, M]``, ``targets [n, B, 32, 32, 2]``. Inside ``shard_map`` over
  ``stages`` when ``num_stages > 1``; returns this device's ``(loss, stats)`` (the
  loss is nonzero on the last stage only, the stats updated for its own stage only).
  """
  spans = decoder_stages(decoder, num_stages, codewords.shape[-1])
  fns = _stage_fns(decoder, spans)
  n = codewords.shape[0]
  s = lax.axis_index(STAGES) if num_stages > 1 else 0
  h = jnp.zeros(targets.shape[1:], jnp.float32)
  loss = jnp.zeros((), jnp.float32)
  forward = [(i, i + 1) for i in range(num_stages - 1)]
  for t in range(n + num_stages - 1):
    cw = codewords[min(t, n - 1)]
    if num_stages > 1:
      out, new_stats = lax.switch(s, fns, params, stats, consts, cw, h)
      valid = (t - s >= 0) & (t - s < n)
      stats = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new_stats, stats)
    else:
      out, stats = fns[0](params, stats, consts, cw, h)
    j = t - (num_stages - 1)  # the micro-batch the last stage finishes at tick t
    if 0 <= j < n:
      loss = loss + jnp.where(s == num_stages - 1, mse(out, targets[j]), 0.0)
    if num_stages > 1:
      h = lax.ppermute(out, STAGES, forward)
  return loss / n, stats


def bts_loss_and_grads(decoder: nn.Module, num_stages: int, params: Any, stats: Any,
                       consts: dict, codewords: Array, targets: Array) -> tuple[Array, Any, Any, Array]:
  """The BTS's training computation on the UEs' codewords.

  Args:
    decoder: the (unbound) decoder, with ``pieces()``.
    num_stages: ``S``; ``> 1`` must run inside ``shard_map`` over a ``stages`` axis
      of size ``S`` (with the inputs replicated over it).
    params, stats: the decoder's ``params`` and ``batch_stats``.
    consts: its constant collections (``{"quant": ...}``, per-layer bit-widths).
    codewords: ``[n, B, M]``, micro-batch ``u`` = UE ``u``'s codewords.
    targets: ``[n, B, 32, 32, 2]``, the CSI the codewords encode.

  Returns:
    ``(loss, grads of params, new stats, grads of codewords [n, B, M])``, the same on
    every stage: ``loss = mean_u mse(decoder(codewords[u]), targets[u])`` with batch
    norm per micro-batch.
  """
  (loss, stats), (g_params, g_cw) = jax.value_and_grad(
      lambda p, c: _pipelined_loss(decoder, num_stages, p, c, targets, stats, consts),
      argnums=(0, 1), has_aux=True)(params, codewords)
  if num_stages == 1:
    return loss, g_params, stats, g_cw
  owner = _owner(decoder, decoder_stages(decoder, num_stages, codewords.shape[-1]))
  s = lax.axis_index(STAGES)
  stats = {k: jax.tree.map(lambda a: jnp.where(s == owner[k], a, 0), v) for k, v in stats.items()}
  return lax.psum((loss, g_params, stats, g_cw), STAGES)
