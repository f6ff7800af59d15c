"""PIC-PQ on the UE side: a trained CSI encoder quantized with the library's LSQ, and its cost.

The UE runs only the encoder (CsiNet: one 3x3 conv and the dense layer to the
codeword; CRNet: five convs and the dense layer). :func:`quantize_encoder` rebuilds
it with ``quantizer=LSQ()`` (:mod:`picpq_jax.compress.quantizers`), sets every
layer's weights to ``w_bits`` and its input activations to ``a_bits`` (32 = float:
the dense layer reads a signed LeakyReLU output, which LSQ's unsigned activation
codes would clip), and initializes LSQ's steps from the trained weights
(:func:`~picpq_jax.compress.calibrate_lsq`): post-training quantization.
:func:`finetune_encoder` is the optional short quantization-aware fine-tune: the
encoder (weights and LSQ steps) learns through the frozen BTS decoder, as the split
method trains it. Channel pruning does not apply: the encoders' convs have 2 to 4
channels and declare no channel groups (the dense layer holds >98% of the weights).

Cost (:func:`encoder_cost`) is the library's cost model
(:mod:`picpq_jax.compress.cost_model`): FLOPs (= MACs), parameters (kernels and
biases; batch norm folds into the conv), BOPs (conv: MACs x w_bits x a_bits; dense:
params x w_bits x a_bits), and the bytes the UE stores, ``sum(params x w_bits) / 8``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from picpq_jax.compress.cost_model import full_masks, layer_costs
from picpq_jax.compress.quantizers import LSQ, calibrate_lsq
from picpq_jax.csi.models import SAMPLE_SHAPE, get_csi_model
from picpq_jax.csi.pipeline import mse
from picpq_jax.csi.methods import ADAM  # lr 1: the learning rate scales each update
from picpq_jax.errors import UserError
from picpq_jax.federated.steps import PartState, apply_update
from picpq_jax.models.quantizer import FULL_PRECISION_BITS
from picpq_jax.models.structure import model_structure

Array = jax.Array


def quantized_encoder(arch: str, cr: int) -> nn.Module:
  """The UE encoder of ``arch`` at ``cr`` built with LSQ quantizers (bits from ``quant``)."""
  return get_csi_model(arch, cr, quantizer=LSQ()).encoder


def encoder_quant(encoder: nn.Module, w_bits: int, a_bits: int = FULL_PRECISION_BITS,
                  conv_w_bits: int | None = None) -> dict:
  """The ``quant`` collection of ``encoder``: every layer's weights at ``w_bits`` (its
  convs' at ``conv_w_bits`` when given) and inputs at ``a_bits``."""
  conv_w_bits = w_bits if conv_w_bits is None else conv_w_bits
  for name, b in (("w_bits", w_bits), ("a_bits", a_bits), ("conv_w_bits", conv_w_bits)):
    if not (2 <= b <= 16 or b == FULL_PRECISION_BITS):
      raise UserError(f"encoder {name}={b}: use 2..16 or {FULL_PRECISION_BITS} (float)")
  flat = {}
  for layer in model_structure(encoder, SAMPLE_SHAPE).layers:
    flat[f"{layer.name}/w_bits"] = jnp.int32(conv_w_bits if layer.kind == "conv" else w_bits)
    flat[f"{layer.name}/a_bits"] = jnp.int32(a_bits)
  return traverse_util.unflatten_dict(flat, sep="/")


def quantize_encoder(arch: str, cr: int, variables: dict, w_bits: int, x: Array,
                     a_bits: int = FULL_PRECISION_BITS,
                     conv_w_bits: int | None = None) -> tuple[nn.Module, dict]:
  """``(LSQ encoder, its variables)`` from a trained float encoder's ``variables``.

  Args:
    variables: one encoder's ``{"params", "batch_stats"}`` (float, trained).
    w_bits, a_bits, conv_w_bits: see :func:`encoder_quant`.
    x: ``[N, 32, 32, 2]`` CSI the UE holds, for LSQ's activation steps.
  """
  encoder = quantized_encoder(arch, cr)
  fresh = jax.eval_shape(functools.partial(encoder.init, train=False), jax.random.key(0),
                         jax.ShapeDtypeStruct((1, *SAMPLE_SHAPE), jnp.float32))
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  for name in traverse_util.flatten_dict(fresh["params"], sep="/"):
    flat.setdefault(name, jnp.ones((), jnp.float32))  # LSQ steps: set by calibrate_lsq
  v = {"params": traverse_util.unflatten_dict(flat, sep="/"),
       "batch_stats": variables["batch_stats"], "quant": encoder_quant(encoder, w_bits, a_bits, conv_w_bits)}
  return encoder, _calibrate(encoder, v, x)


# One compilation per encoder (bits are traced): many UEs' encoders share it.
_calibrate = jax.jit(calibrate_lsq, static_argnums=0)


def encoder_cost(encoder: nn.Module, quant: dict | None = None) -> dict[str, float]:
  """``{"flops", "params", "bops", "bytes"}`` per sample of ``encoder`` at the bits of
  ``quant`` (None: 32 everywhere); see the module docstring."""
  structure = model_structure(encoder, SAMPLE_SHAPE)
  c = layer_costs(structure, full_masks(structure), quant)
  return {"flops": float(jnp.sum(c.macs)), "params": float(jnp.sum(c.params)),
          "bops": float(jnp.sum(c.bops)), "bytes": float(jnp.sum(c.params * c.w_bits)) / 8}


@functools.partial(jax.jit, static_argnums=(0, 1))
def reconstruct(encoder: nn.Module, decoder: nn.Module, enc_vars: dict, dec_vars: dict,
                x: Array) -> Array:
  """``decoder(encoder(x))`` in inference mode, ``[N, 32, 32, 2] -> [N, 32, 32, 2]``."""
  return decoder.apply(dec_vars, encoder.apply(enc_vars, x, train=False), train=False)


def finetune_encoder(encoder: nn.Module, decoder: nn.Module, enc_vars: dict, dec_vars: dict,
                     x: np.ndarray, steps: int, batch_size: int, lr: float,
                     seed: int = 0) -> dict:
  """Quantization-aware fine-tune of one UE's encoder through the frozen decoder.

  Adam on the encoder's params (weights and LSQ steps) for ``steps`` steps on
  batches of ``x [N, 32, 32, 2]`` drawn from ``seed``; the encoder's batch norm in
  training mode, the decoder in inference mode; loss: MSE of the reconstruction.
  Returns the encoder's new variables.
  """
  consts = {k: v for k, v in enc_vars.items() if k not in ("params", "batch_stats")}
  step = _finetune_step(encoder, decoder)
  part = PartState.create(enc_vars, ADAM)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    part, _ = step(part, consts, dec_vars, jnp.asarray(x[rng.integers(0, len(x), batch_size)]),
                   jnp.float32(lr))
  return part.variables(consts)


@functools.lru_cache(maxsize=8)
def _finetune_step(encoder: nn.Module, decoder: nn.Module):
  """The jitted fine-tune step ``(part, consts, dec_vars, x, lr) -> (part, loss)``, one
  compilation per (encoder, decoder) for every UE."""
  @jax.jit
  def step(part, consts, dec_vars, xb, lr):
    def loss_fn(params):
      cw, upd = encoder.apply({**part.variables(consts), "params": params}, xb, train=True,
                              mutable=["batch_stats"])
      return mse(decoder.apply(dec_vars, cw, train=False), xb), upd["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(part.params)
    return apply_update(ADAM, part.replace(batch_stats=stats), grads, lr), loss
  return step
