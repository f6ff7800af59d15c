"""Filter properties (DESIGN.md section 1): one float32 score per output filter.

A filter property (FP) maps every *prunable layer* (a layer whose ``out_group`` is
not None, in structure order; see :func:`picpq_jax.compress.pic.prunable_layers`)
to a float32 vector ``[C_out]``: ``{layer_name: float32 [C_out]}``. The
physics-inspired criterion (:mod:`picpq_jax.compress.pic`) turns it into channel
importances.

* ``"rank"`` (HRank, the reference): the average matrix rank of the filter's HxW
  output feature maps over a few batches (reference: 6 batches of 128).
* ``"l1"`` / ``"l2"``: the L1 / L2 norm of the filter's weights.
* ``"bn_gamma"``: ``|gamma|`` of the BatchNorm that follows the conv.

**Which feature map.** HRank hooks the ReLU after each conv-BN (for a ResNet block's
second conv: the ReLU after the residual addition). ``point="activation"`` (the
default) takes that map generically: library models apply a group's channel mask
exactly there, ``x * mask``, after the normalization, activation and residual
addition that follow the writing conv (see :mod:`picpq_jax.models.layers`). During
``apply`` each mask is replaced by a probe that records the masked product, and a
layer's map is the first product of its ``out_group`` recorded after the layer ran.
Writers summed by one residual addition (an ImageNet ResNet's ``conv2`` and
``downsample_conv``) therefore share one map; a depthwise conv gets the map after
its own BN and activation. MobileNetV2's linear projections have no activation:
their map is the (masked) block output. ``point="conv"`` takes the raw conv output
instead (before BN, activation and mask).

The model files are not touched: maps are collected with ``nn.intercept_methods``
and the mask probes, inside one jitted function per (model, structure, point),
which JAX compiles once per batch shape. Inference mode (``train=False``: BN running
statistics), as HRank's ``net.eval()``.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from picpq_jax import compile_options
from picpq_jax.errors import UserError
from picpq_jax.models.layers import QConv, QDense
from picpq_jax.models.structure import ModelStructure

Array = jax.Array
FilterProperty = dict[str, Array]  # {layer_name: float32 [C_out]}, prunable layers only

CAPTURE_POINTS = ("activation", "conv")
FILTER_PROPERTIES = ("rank", "l1", "l2", "bn_gamma")
RANK_METHODS = ("svd", "bidiagonal")


def _prunable(structure: ModelStructure) -> tuple[str, ...]:
  return tuple(l.name for l in structure.layers if l.out_group is not None)


# ----------------------------------------------------------------------------- rank


def _map_ranks(maps: Array) -> Array:
  """Matrix rank of each ``[H, W]`` map of ``maps`` ``[N, H, W, C]`` -> int32 ``[N, C]``.

  ``numpy.linalg.matrix_rank``'s rule, in float32: count the singular values
  ``S > S.max() * max(H, W) * eps32``, all ``N * C`` maps in one batched SVD.

  Not the Gram matrix: its eigenvalues ``S^2`` carry float32 noise of order
  ``eps32 * S.max()^2``, so only ``S > S.max() * sqrt(k * eps32)`` (2e-3 at k=32)
  can be resolved, and post-ReLU maps often have singular values between that and
  numpy's threshold (3.8e-6 at 32x32). On this CPU the SVD is also faster (per
  map: 51 vs 81 us at 32x32, 17 vs 28 us at 16x16, 6.4 vs 7.4 us at 8x8), and with
  jaxlib 0.10.2 a jitted model forward followed by batched ``eigvalsh`` hung on CPU.
  """
  x = jnp.moveaxis(maps.astype(jnp.float32), -1, 1)  # [N, C, H, W]
  s = jnp.linalg.svd(x, compute_uv=False)  # [N, C, min(H, W)], descending
  tol = s[..., :1] * (max(x.shape[-2:]) * jnp.finfo(jnp.float32).eps)
  return jnp.sum(s > tol, axis=-1, dtype=jnp.int32)


# Bisection steps for the largest singular value: the bracket [max |b|, sqrt(2n) max |b|]
# shrinks to a relative width sqrt(2n) ** (2 ** -16) - 1 <= 4e-5 (n <= 64), far inside
# the float32 rounding of singular values near numpy's tolerance.
_SMAX_BISECTIONS = 16
# Maps per chunk of the bidiagonalization: about 2 MiB of float32 maps, one L2 cache.
_CHUNK_BYTES = 2 ** 21


def _householder(x: Array) -> tuple[Array, Array, Array]:
  """Reflector of each row of ``x`` ``[B, k]``: ``(I - beta v v^T) x = alpha e_1``.

  Returns ``v [B, k]``, ``beta [B]`` (0 for a zero row) and ``alpha [B]``. ``beta``
  is computed from ``v`` itself and the three go through an optimization barrier,
  so every consumer sees the same values: XLA may otherwise recompute ``v`` in two
  fusions with different rounding (with and without FMA), and a ``beta`` that does
  not match ``v`` makes the reflection non-orthogonal, which on rounding-noise
  entries (a rank-deficient map) blew a zero singular value up to 6e-6 * S.max.
  """
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1))
  x0 = x[:, 0]
  alpha = -jnp.where(x0 >= 0, 1.0, -1.0).astype(x.dtype) * norm
  v = jnp.concatenate([(x0 - alpha)[:, None], x[:, 1:]], axis=1)
  vv = jnp.sum(v * v, axis=-1)
  beta = jnp.where(vv > 0, 2.0 / jnp.where(vv > 0, vv, 1.0), 0.0)
  return jax.lax.optimization_barrier((v, beta, alpha))


def _bidiagonalize(a: Array) -> tuple[Array, Array]:
  """Golub-Kahan bidiagonalization by Householder reflections, batched.

  ``a [B, m, n]`` with ``m >= n`` -> diagonal ``d [n, B]`` and superdiagonal
  ``e [n - 1, B]`` of an upper bidiagonal matrix with ``a``'s singular values (up
  to signs). Unrolled over the ``n`` columns on ever smaller trailing blocks.
  """
  n = a.shape[2]
  d, e = [], []
  for _ in range(n):
    v, beta, alpha = _householder(a[:, :, 0])
    d.append(alpha)
    if a.shape[2] == 1:
      break
    rest = a[:, :, 1:]  # left reflection of the remaining columns
    w = jnp.sum(v[:, :, None] * rest, axis=1)
    rest = rest - (beta[:, None] * v)[:, :, None] * w[:, None, :]
    row, sub = rest[:, 0], rest[:, 1:]
    if row.shape[1] >= 2:  # right reflection of the rest of the row
      u, gamma, alpha_row = _householder(row)
      e.append(alpha_row)
      z = jnp.sum(sub * u[:, None, :], axis=2)
      sub = sub - (gamma[:, None] * z)[:, :, None] * u[:, None, :]
    else:
      e.append(row[:, 0])
    a = sub
  return jnp.stack(d), jnp.stack(e) if e else jnp.zeros((0, a.shape[0]), a.dtype)


def _count_below(b2: Array, x: Array) -> Array:
  """Eigenvalues below ``x [B]`` of the zero-diagonal symmetric tridiagonal matrix with
  squared off-diagonal ``b2 [k, B]`` (a Sturm sequence: the negative pivots of its
  LDL^T shifted by ``x``) -> int32 ``[B]``."""
  tiny = jnp.finfo(b2.dtype).tiny
  q = -x
  count = (q < 0).astype(jnp.int32)
  for i in range(b2.shape[0]):
    q = -x - b2[i] / jnp.where(q == 0, -tiny, q)
    count = count + (q < 0)
  return count


def _bidiagonal_ranks(maps: Array) -> Array:
  """``numpy.linalg.matrix_rank`` of each ``[m, n]`` matrix of ``maps [B, m, n]`` -> int32 [B].

  Each matrix is scaled to unit Frobenius norm (after dividing by its largest
  entry, so that tiny maps do not underflow) and bidiagonalized; its singular
  values are the nonnegative eigenvalues of the ``2n x 2n`` Golub-Kahan matrix
  (zero diagonal, off-diagonal ``d_1, e_1, d_2, ...``), counted by Sturm sequences
  without forming ``A^T A`` (whose float32 eigenvalues cannot resolve numpy's
  tolerance). ``S.max`` is bracketed by ``[max |b|, sqrt(2n) max |b|]`` and
  bisected; the rank is the number of singular values above
  ``S.max * max(m, n) * eps32``. Only elementwise ops and reductions, vectorized
  over the batch: 2-6x faster than LAPACK's batched SVD on a 2-core CPU.
  """
  b, m, n = maps.shape
  if m < n:
    maps, m, n = jnp.swapaxes(maps, 1, 2), n, m
  amax = jnp.max(jnp.abs(maps), axis=(1, 2))  # scale first: squares of 1e-30 underflow
  scaled = maps / jnp.where(amax > 0, amax, 1.0)[:, None, None]
  fro = jnp.sqrt(jnp.sum(scaled * scaled, axis=(1, 2)))
  d, e = _bidiagonalize(scaled / jnp.where(amax > 0, fro, 1.0)[:, None, None])
  if n > 1:
    offdiag = jnp.concatenate([jnp.stack([d[:-1], e], axis=1).reshape(2 * n - 2, b), d[-1:]])
  else:
    offdiag = d
  b2 = offdiag * offdiag

  def bisect(_, bracket):
    lo, hi = bracket
    mid = jnp.sqrt(lo * hi)
    above = _count_below(b2, mid) < 2 * n  # some singular value >= mid
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo = jnp.sqrt(jnp.max(b2, axis=0))
  hi = jnp.maximum(lo * np.sqrt(2 * n), jnp.finfo(jnp.float32).tiny) * 1.0001
  _, smax = jax.lax.fori_loop(0, _SMAX_BISECTIONS, bisect, (lo, hi))
  tol = smax * (max(m, n) * jnp.finfo(jnp.float32).eps)
  return jnp.where(amax > 0, 2 * n - _count_below(b2, tol), 0).astype(jnp.int32)


def _chunked_ranks(maps: Array) -> Array:
  """:func:`_bidiagonal_ranks` over chunks of about 2 MiB (``lax.map``), so that each
  chunk's reflections stay in cache; ``maps [B, m, n]`` -> int32 ``[B]``."""
  b, m, n = maps.shape
  chunk = max(1, _CHUNK_BYTES // (4 * m * n))
  if b <= chunk:
    return _bidiagonal_ranks(maps)
  pad = -b % chunk
  padded = jnp.concatenate([maps, jnp.zeros((pad, m, n), maps.dtype)]) if pad else maps
  ranks = jax.lax.map(_bidiagonal_ranks, padded.reshape(-1, chunk, m, n))
  return ranks.reshape(-1)[:b]


def _layer_ranks_bidiagonal(maps: Mapping[str, Array]) -> dict[str, Array]:
  """``{layer: [N, H, W, C]}`` -> ``{layer: int32 [N, C]}`` by :func:`_chunked_ranks`,
  all maps of one ``(H, W)`` in one call (one compiled bidiagonalization per size)."""
  by_size: dict[tuple[int, int], list[str]] = {}
  for name, m in maps.items():
    by_size.setdefault(m.shape[1:3], []).append(name)
  out = {}
  for names in by_size.values():
    flat = [jnp.moveaxis(maps[k].astype(jnp.float32), -1, 1) for k in names]  # [N, C, H, W]
    sizes = [x.shape[0] * x.shape[1] for x in flat]
    ranks = _chunked_ranks(jnp.concatenate([x.reshape(-1, *x.shape[2:]) for x in flat]))
    start = 0
    for name, x, size in zip(names, flat, sizes):
      out[name] = ranks[start:start + size].reshape(x.shape[:2])
      start += size
  return out


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise UserError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")


def feature_map_rank(maps: Array, method: str = "svd") -> Array:
  """HRank's filter property of one layer: average rank of its feature maps.

  Args:
    maps: ``[N, H, W, C]`` output feature maps of a layer (any float dtype); each
      ``[H, W]`` slice is a matrix.
    method: ``"svd"`` (one batched LAPACK SVD, :func:`_map_ranks`) or
      ``"bidiagonal"`` (batched Householder bidiagonalization and Sturm counts,
      :func:`_bidiagonal_ranks`; faster on CPU, slower to compile). Both apply
      ``numpy.linalg.matrix_rank``'s tolerance in float32.

  Returns:
    float32 ``[C]``: ``mean_n rank(maps[n, :, :, c])``. Jittable.
  """
  chex.assert_rank(maps, 4)
  _check_choice("rank method", method, RANK_METHODS)
  if method == "svd":
    ranks = _map_ranks(maps)
  else:
    ranks = _layer_ranks_bidiagonal({"maps": maps})["maps"]
  return jnp.mean(ranks.astype(jnp.float32), axis=0)


class _MaskProbe:
  """Stands in for a group's mask during ``apply``: ``x * probe`` returns ``x * mask``
  and records it in ``events`` as ``("mask", group, x * mask)``. Other attributes
  (``shape``, ``dtype``, ...) are the mask's. No ``__jax_array__``: JAX would convert
  the probe silently instead of deferring the product to ``__rmul__``."""

  __array_ufunc__ = None  # make NumPy arrays defer to __rmul__

  def __init__(self, group: str, mask: Array, events: list):
    self.group, self.mask, self.events = group, mask, events

  def __getattr__(self, name: str):
    if name.startswith("__") or name in ("group", "mask", "events"):
      raise AttributeError(name)
    return getattr(self.mask, name)

  def __mul__(self, other: Array) -> Array:
    out = other * self.mask
    self.events.append(("mask", self.group, out))
    return out

  __rmul__ = __mul__


def _maps_from_events(events: list, structure: ModelStructure) -> dict[str, Array]:
  """Each prunable layer's map: the first product of its group's mask after it ran."""
  out_group = {l.name: l.out_group for l in structure.layers}
  pending: dict[str, list[str]] = {}
  maps = {}
  for kind, key, value in events:
    if kind == "layer" and out_group.get(key) is not None:
      pending.setdefault(out_group[key], []).append(key)
    elif kind == "mask":
      for name in pending.pop(key, []):
        maps[name] = value
  return maps


def _capture(model: nn.Module, structure: ModelStructure, variables: Mapping[str, Any],
             images: Array, point: str) -> dict[str, Array]:
  """Feature maps ``{layer: [N, H, W, C] or [N, C]}`` of every prunable layer."""
  events: list = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, (QConv, QDense)):
      events.append(("layer", "/".join(context.module.path), out))
    return out

  variables = dict(variables)
  if point == "activation":
    variables["masks"] = {g: _MaskProbe(g, m, events) for g, m in variables["masks"].items()}
  with nn.intercept_methods(record):
    model.apply(variables, images, train=False)
  if point == "conv":
    maps = {name: out for kind, name, out in events if kind == "layer"}
  else:
    maps = _maps_from_events(events, structure)
  missing = [name for name in _prunable(structure) if name not in maps]
  if missing:
    raise UserError(
        f"no {point} feature map was seen for layers {missing} (their group's mask is not "
        f"applied as 'x * mask'): use point='conv'")
  return {name: maps[name] for name in _prunable(structure)}


@functools.lru_cache(maxsize=32)
def _rank_sums_fn(model: nn.Module, structure: ModelStructure, point: str,
                  method: str = "svd"):
  """Jitted ``(variables, images [B, H, W, C]) -> {layer: int32 [C]}``: ranks summed over B."""

  def rank_sums(variables, images):
    maps = {name: m if m.ndim == 4 else m[:, None, None, :]  # a dense output is a 1x1 map
            for name, m in _capture(model, structure, variables, images, point).items()}
    if method == "svd":
      ranks = {name: _map_ranks(m) for name, m in maps.items()}
    else:
      ranks = _layer_ranks_bidiagonal(maps)
    return {name: jnp.sum(ranks[name], axis=0, dtype=jnp.int32) for name in maps}

  return compile_options.jit(rank_sums)


def filter_property_rank(model: nn.Module, variables: Mapping[str, Any],
                         batches: Iterable[Array], structure: ModelStructure, *,
                         point: str = "activation", method: str = "svd") -> FilterProperty:
  """HRank filter property of every prunable layer (DESIGN.md section 1).

  Args:
    model: a library model (static: hashable Flax module).
    variables: ``{"params", "batch_stats", "masks", "quant"}`` of ``model``.
    batches: iterable of float32 images ``[B, H, W, C]``, already normalized
      (reference: 6 batches of 128 training images).
    structure: ``model_structure(model, ...)``.
    point: ``"activation"`` (HRank's post-activation map, the default) or ``"conv"``
      (the raw conv output); see the module docstring.
    method: how each map's rank is computed, see :func:`feature_map_rank`.
      ``"bidiagonal"`` factors all maps of one size together and was 3-5x faster
      than ``"svd"`` for a whole ResNet-56 on a 2-core CPU, for a longer compile
      (``experiments/bench/RESULTS.md``).

  Returns:
    ``{layer_name: float32 [C_out]}``: for each prunable layer, the mean over all
    images of the rank of each output channel's map. A masked-out channel has rank 0
    with ``point="activation"``. One compiled function per batch shape; the sums
    are accumulated on the host.
  """
  _check_choice("capture point", point, CAPTURE_POINTS)
  _check_choice("rank method", method, RANK_METHODS)
  fn = _rank_sums_fn(model, structure, point, method)
  totals, count = None, 0
  for images in batches:
    chex.assert_rank(images, 4)
    sums = jax.device_get(fn(variables, images))
    totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
    count += images.shape[0]
  if not count:
    raise UserError("filter_property_rank got no images: pass at least one non-empty batch")
  return {k: jnp.asarray(totals[k] / count, jnp.float32) for k in _prunable(structure)}


# ---------------------------------------------------------------------- weight-based


def _kernels(params: Mapping[str, Any], structure: ModelStructure) -> dict[str, Array]:
  """``{layer: kernel as [fan_in, C_out]}`` of the prunable layers."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for name in _prunable(structure):
    kernel = flat[f"{name}/kernel"]
    out[name] = jnp.reshape(kernel, (-1, kernel.shape[-1]))
  return out


def l1_norm(params: Mapping[str, Any], structure: ModelStructure) -> FilterProperty:
  """``sum |W|`` over ``kh, kw, c_in`` of each output filter: ``{layer: float32 [C_out]}``.

  ``params`` is the model's ``params`` collection (kernels HWIO, dense ``[in, out]``).
  """
  return {k: jnp.sum(jnp.abs(w), axis=0).astype(jnp.float32)
          for k, w in _kernels(params, structure).items()}


def l2_norm(params: Mapping[str, Any], structure: ModelStructure) -> FilterProperty:
  """``sqrt(sum W^2)`` over ``kh, kw, c_in`` of each output filter: ``{layer: float32 [C_out]}``."""
  return {k: jnp.sqrt(jnp.sum(jnp.square(w), axis=0)).astype(jnp.float32)
          for k, w in _kernels(params, structure).items()}


def bn_name(layer_name: str) -> str:
  """Path of the BatchNorm that follows conv ``layer_name``, by the library's convention.

  The last path component with its last ``"conv"`` replaced by ``"bn"``:
  ``conv1 -> bn1`` (ResNet blocks), ``stem_conv -> stem_bn``, ``downsample_conv ->
  downsample_bn``, ``expand_conv``/``dw_conv``/``project_conv``/``last_conv`` ->
  ``*_bn`` (MobileNetV2), ``layer{i}/conv -> layer{i}/bn`` (VGG).
  """
  *prefix, last = layer_name.split("/")
  i = last.rfind("conv")
  if i < 0:
    raise UserError(
        f"layer {layer_name!r} has no 'conv' in its name, so no BatchNorm can be matched "
        f"to it: use filter property 'l1', 'l2' or 'rank'")
  return "/".join([*prefix, last[:i] + "bn" + last[i + 4:]])


def bn_gamma(params: Mapping[str, Any], structure: ModelStructure) -> FilterProperty:
  """``|gamma|`` (the BN ``scale``) after each prunable conv: ``{layer: float32 [C_out]}``.

  The BN is found by :func:`bn_name`; a layer without one raises a UserError.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for name in _prunable(structure):
    path = f"{bn_name(name)}/scale"
    if path not in flat:
      raise UserError(
          f"layer {name!r} has no BatchNorm {bn_name(name)!r} after it (convention: its "
          f"name with 'conv' replaced by 'bn'): use filter property 'l1', 'l2' or 'rank'")
    out[name] = jnp.abs(flat[path]).astype(jnp.float32)
  return out


def filter_property(name: str, model: nn.Module, variables: Mapping[str, Any],
                    batches: Iterable[Array] | None, structure: ModelStructure,
                    **rank_options: str) -> FilterProperty:
  """The filter property ``name`` of every prunable layer: ``{layer: float32 [C_out]}``.

  Args:
    name: ``"rank"`` (:func:`filter_property_rank`; needs ``batches``), ``"l1"``,
      ``"l2"`` or ``"bn_gamma"`` (read ``variables["params"]`` only).
    model, variables, batches, structure: as in :func:`filter_property_rank`.
    **rank_options: ``point`` and ``method`` of :func:`filter_property_rank`.
  """
  _check_choice("filter property", name, FILTER_PROPERTIES)
  if name == "rank":
    if batches is None:
      raise UserError("filter property 'rank' needs batches of images: pass batches=...")
    return filter_property_rank(model, variables, batches, structure, **rank_options)
  if rank_options:
    raise UserError(f"options {sorted(rank_options)} apply to filter property 'rank' only")
  fn = {"l1": l1_norm, "l2": l2_norm, "bn_gamma": bn_gamma}[name]
  return fn(variables["params"], structure)
