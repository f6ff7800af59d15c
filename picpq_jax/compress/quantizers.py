"""DoReFa, LSQ and PACT quantizers for :class:`~picpq_jax.models.QConv` / ``QDense``.

Each is a frozen dataclass implementing the
:class:`~picpq_jax.models.quantizer.Quantizer` protocol; pass one to a model
constructor (``get_model("resnet20", quantizer=DoReFa())``) and every conv and
dense layer uses it. All three are written with :mod:`picpq_jax.compress.numerics`
(one rounding, one clip, one gradient scale, each with its backward pass).

What is static and what is traced (as AQT states it):

* **Static** (hashable, part of the compiled program; changing them recompiles):
  the quantizer object and its fields (``LSQ.weight_step_init``,
  ``LSQ.act_step_init``, ``PACT.alpha_init``), i.e. which formula runs.
* **Traced** (data; changing them never recompiles): the per-layer bit-widths
  ``quant/<layer>/w_bits`` and ``a_bits`` (int32 scalars; ``>= 32`` means full
  precision, a bit-exact pass-through by ``jnp.where``), and the learnable
  quantizer parameters in ``params``: LSQ's ``lsq_w_step``/``lsq_a_step`` and
  PACT's ``pact_alpha`` (float32 scalars, one per layer).

Bit-widths below what a formula can represent are raised to its minimum instead
of producing NaNs (traced values cannot raise): signed weights use at least 2
bits (ternary ``{-1, 0, 1}`` levels), unsigned activations at least 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from picpq_jax.compress.numerics import (bypass_full_precision, clip_ste, max_level, round_ste,
                                         scale_grad, uniform_quantize)
from picpq_jax.errors import UserError
from picpq_jax.models.layers import QConv, QDense
from picpq_jax.models.quantizer import FULL_PRECISION_BITS

Array = jax.Array


def _constant_init(value: float, key: jax.Array, shape: tuple[int, ...]) -> Array:
  del key
  return jnp.full(shape, value, jnp.float32)


def _signed_bits(bits: Array) -> Array:
  """Bit-width of a signed code, at least 2 (one sign bit and one magnitude bit)."""
  return jnp.maximum(jnp.asarray(bits, jnp.int32), 2)


def dorefa_weights(w: Array, bits: Array) -> Array:
  """DoReFa weights as DESIGN.md section 6 states them, without the 32-bit bypass.

  ``t = tanh(W) / max|tanh(W)|`` lies in ``[-1, 1]``; it is rounded to ``k-1``
  magnitude bits plus a sign: ``q = round(t * n) / n`` with ``n = 2^(k-1) - 1``, so
  the levels are ``{-n, ..., n} / n``, ``2^k - 1`` of them, symmetric about 0 (0
  is a level; half-to-even rounding is odd-symmetric). The round is straight-
  through; the gradient flows through ``tanh`` and the normalization (the max is
  not detached). An all-zero kernel stays zero.

  Args:
    w: float kernel, any shape.
    bits: int32 scalar ``k`` (traced); ``k < 2`` counts as 2.

  Returns:
    Quantized kernel in ``[-1, 1]``, shape and dtype of ``w``.
  """
  t = jnp.tanh(w)
  m = jnp.max(jnp.abs(t))
  t = t / jnp.where(m > 0, m, jnp.ones_like(m))
  n = max_level(_signed_bits(bits) - 1, w.dtype)
  return round_ste(t * n) / n


def dorefa_activations(x: Array, bits: Array) -> Array:
  """DoReFa activations, without the 32-bit bypass: ``quantize_k(clip(x, 0, 1))``.

  ``round(clip(x, 0, 1) * (2^k - 1)) / (2^k - 1)``: ``2^k`` levels on ``[0, 1]``.
  Gradient: 1 where ``0 <= x <= 1`` (``torch.clamp``'s rule), 0 elsewhere.

  Args:
    x: float activations, any shape.
    bits: int32 scalar ``k`` (traced); ``k < 1`` counts as 1.
  """
  return uniform_quantize(clip_ste(x, 0.0, 1.0), bits)


def lsq_quantize(v: Array, step: Array, q_n: Array, q_p: Array, count: int) -> Array:
  """LSQ (Esser et al. 2020, eq. 1): ``round(clip(v / s, -Q_N, Q_P)) * s``.

  Gradients (eqs. 3 and 5): ``dv_hat/dv = 1`` for ``-Q_N < v/s < Q_P``, else 0;
  ``dv_hat/ds = -v/s + round(v/s)`` inside, ``-Q_N`` at or below, ``Q_P`` at or
  above, multiplied by ``g = 1 / sqrt(count * Q_P)`` (section 2.2).

  Args:
    v: float array to quantize.
    step: float32 scalar ``s > 0``.
    q_n, q_p: float scalars, the negative and positive level counts.
    count: static number of values the step serves (``N_W`` or ``N_F``).
  """
  chex.assert_rank(step, 0)
  s = scale_grad(step.astype(v.dtype), lax.rsqrt(count * q_p).astype(v.dtype))
  return round_ste(clip_ste(v / s, -q_n, q_p, ties_inside=False)) * s


def _lsq_weight_levels(bits: Array, dtype) -> tuple[Array, Array]:
  """``(Q_N, Q_P) = (2^(k-1), 2^(k-1) - 1)``: signed codes ``[-2^(k-1), 2^(k-1) - 1]``."""
  q_p = max_level(_signed_bits(bits) - 1, dtype)
  return q_p + 1, q_p


@dataclasses.dataclass(frozen=True)
class DoReFa:
  """DoReFa-Net quantization (Zhou et al. 2016), the PIC-PQ reference numerics.

  Weights: :func:`dorefa_weights` (``2^k - 1`` symmetric levels in ``[-1, 1]``).
  Activations: :func:`dorefa_activations` (``2^k`` levels in ``[0, 1]``). No
  learnable parameters. ``bits >= 32`` returns the input unchanged.
  """

  def param_inits(self, kernel_shape: tuple[int, ...]) -> Mapping[str, Any]:
    del kernel_shape
    return {}

  def weights(self, w: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    del qparams
    return bypass_full_precision(bits, w, dorefa_weights(w, bits))

  def activations(self, x: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    del qparams
    return bypass_full_precision(bits, x, dorefa_activations(x, bits))


@dataclasses.dataclass(frozen=True)
class LSQ:
  """Learned step size quantization (Esser et al. 2020).

  Per layer, two learnable float32 scalar steps in ``params``: ``lsq_w_step`` for
  the kernel (signed codes ``[-2^(k-1), 2^(k-1) - 1]``, ``N_W`` = kernel size) and
  ``lsq_a_step`` for the input activations (unsigned codes ``[0, 2^k - 1]``,
  ``N_F`` = features per example, so ``g`` does not depend on the batch size).

  Initialization: ``param_inits`` sees only the kernel's shape, so the steps start
  at the constants ``weight_step_init`` and ``act_step_init``; LSQ's own init,
  ``s = 2 mean|v| / sqrt(Q_P)`` from the weights and a batch of activations at the
  layer's assigned bit-widths, is :func:`calibrate_lsq`, to be called once the
  bits are set and before fine-tuning. Steps must stay positive.

  Attributes:
    weight_step_init: initial ``lsq_w_step`` (0.05 is ``2 mean|w| / sqrt(7)`` for
      a He-initialized CIFAR ResNet conv at 4 bits, roughly).
    act_step_init: initial ``lsq_a_step``.
  """

  weight_step_init: float = 0.05
  act_step_init: float = 0.1

  def param_inits(self, kernel_shape: tuple[int, ...]) -> Mapping[str, Any]:
    del kernel_shape
    return {"lsq_w_step": (functools.partial(_constant_init, self.weight_step_init), ()),
            "lsq_a_step": (functools.partial(_constant_init, self.act_step_init), ())}

  def weights(self, w: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    q_n, q_p = _lsq_weight_levels(bits, w.dtype)
    q = lsq_quantize(w, qparams["lsq_w_step"], q_n, q_p, w.size)
    return bypass_full_precision(bits, w, q)

  def activations(self, x: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    q_p = max_level(bits, x.dtype)
    count = math.prod(x.shape[1:]) if x.ndim > 1 else x.size
    q = lsq_quantize(x, qparams["lsq_a_step"], jnp.zeros_like(q_p), q_p, count)
    return bypass_full_precision(bits, x, q)


@dataclasses.dataclass(frozen=True)
class PACT:
  """Parameterized clipping activation (Choi et al. 2018) with DoReFa weights.

  Activations (eqs. 1-2): ``y = clip(x, 0, alpha)``, then
  ``y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)``, with a learnable
  float32 scalar ``pact_alpha`` per layer in ``params``. Gradients (eq. 3, STE):
  ``dy_q/dx = 1`` for ``0 < x < alpha`` and ``dy_q/dalpha = 1`` for
  ``x >= alpha``, 0 elsewhere (the scale ``alpha / (2^k - 1)`` is held constant
  in the backward pass, as eq. 3 does). Weights: :func:`dorefa_weights`, as PACT
  quantizes weights with DoReFa. The paper's L2 penalty on ``alpha`` is the
  optimizer's weight decay on ``params``.

  Attributes:
    alpha_init: initial clip ``alpha`` (10.0: a large clip, the value common PACT
      implementations start from, so training first shrinks it).
  """

  alpha_init: float = 10.0

  def param_inits(self, kernel_shape: tuple[int, ...]) -> Mapping[str, Any]:
    del kernel_shape
    return {"pact_alpha": (functools.partial(_constant_init, self.alpha_init), ())}

  def weights(self, w: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    del qparams
    return bypass_full_precision(bits, w, dorefa_weights(w, bits))

  def activations(self, x: Array, bits: Array, qparams: Mapping[str, Array]) -> Array:
    alpha = qparams["pact_alpha"].astype(x.dtype)
    y = clip_ste(x, 0.0, alpha, ties_inside=False)
    scale = lax.stop_gradient(alpha)
    q = uniform_quantize(y / scale, bits) * scale
    return bypass_full_precision(bits, x, q)


# The one table of quantizer names (``--quantizer``, a compress run's config.json).
QUANTIZERS = {"dorefa": DoReFa, "lsq": LSQ, "pact": PACT}


def make_quantizer(name: str):
  """The quantizer called ``name`` (a key of :data:`QUANTIZERS`), with its defaults."""
  return QUANTIZERS[name]()


def _layer_inputs(model: nn.Module, variables: Mapping[str, Any], x: Array) -> dict[str, Array]:
  """Inputs of every LSQ-quantized ``QConv``/``QDense``, keyed by '/'-joined path."""
  inputs: dict[str, Array] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, (QConv, QDense))
        and isinstance(module.quantizer, LSQ)):
      inputs["/".join(module.path)] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, x, train=False)
  return inputs


def calibrate_lsq(model: nn.Module, variables: Mapping[str, Any], x: Array) -> dict:
  """LSQ's step initialization, ``s = 2 mean|v| / sqrt(Q_P)``, for every LSQ layer.

  ``lsq_w_step`` comes from the layer's kernel with ``Q_P = 2^(k-1) - 1`` at its
  ``w_bits``; ``lsq_a_step`` from the layer's input on the batch ``x`` with
  ``Q_P = 2^k - 1`` at its ``a_bits`` (Esser et al. 2020, section 2.1). The
  activations are those of the full-precision network (every bit-width set to 32
  for this pass, BN in inference mode), so one layer's untrained step does not
  skew the next layer's statistics. Call it once the bit-widths are assigned and
  before fine-tuning. It compiles one program per call (``model`` closed over);
  it can also be called inside a jitted function.

  Args:
    model: a library model built with ``quantizer=LSQ(...)``.
    variables: its ``{"params", "batch_stats", "masks", "quant"}``.
    x: a batch of inputs, ``[N, H, W, C]`` float32.

  Returns:
    ``variables`` with new ``params[...]["lsq_w_step"]`` and ``["lsq_a_step"]``
    (float32 scalars, at least ``1e-8``); everything else is unchanged.

  Raises:
    UserError: the model has no LSQ-quantized layer.
  """
  abstract = jax.eval_shape(functools.partial(_layer_inputs, model), variables, x)
  if not abstract:
    raise UserError("calibrate_lsq: the model has no LSQ layers; build it with quantizer=LSQ()")
  return jax.jit(functools.partial(_calibrate, model))(variables, x)


def _calibrate(model: nn.Module, variables: Mapping[str, Any], x: Array) -> dict:
  full = jax.tree.map(lambda b: jnp.full_like(b, FULL_PRECISION_BITS), variables["quant"])
  inputs = _layer_inputs(model, {**variables, "quant": full}, x)
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  bits = traverse_util.flatten_dict(variables["quant"], sep="/")
  for name, v in inputs.items():
    _, q_p_w = _lsq_weight_levels(bits[f"{name}/w_bits"], jnp.float32)
    q_p_a = max_level(bits[f"{name}/a_bits"], jnp.float32)
    params[f"{name}/lsq_w_step"] = _lsq_init(params[f"{name}/kernel"], q_p_w)
    params[f"{name}/lsq_a_step"] = _lsq_init(v, q_p_a)
  return {**variables, "params": traverse_util.unflatten_dict(params, sep="/")}


def _lsq_init(v: Array, q_p: Array) -> Array:
  step = 2.0 * jnp.mean(jnp.abs(v.astype(jnp.float32))) / jnp.sqrt(q_p)
  return jnp.maximum(step, 1e-8)
