"""Masks and bit-widths are data: changing them never recompiles a jitted apply."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.models import get_model, get_spec


@dataclasses.dataclass(frozen=True)
class RoundToBits:
  """A toy quantizer that reads its bit-width: rounds to ``2**(bits-1)`` levels per unit."""

  def param_inits(self, kernel_shape):
    del kernel_shape
    return {}

  def weights(self, w, bits, qparams):
    del qparams
    scale = 2.0 ** (bits.astype(jnp.float32) - 1)
    return jnp.where(bits >= 32, w, jnp.round(w * scale) / scale)

  def activations(self, x, bits, qparams):
    return self.weights(x, bits, qparams)


def test_masks_and_bits_do_not_recompile(abstract_model, random_vars):
  spec = get_spec("resnet20")
  model = get_model("resnet20", quantizer=RoundToBits())
  variables = random_vars(abstract_model("resnet20")[2], seed=0)
  traces = []

  @jax.jit
  def apply(variables, x):
    traces.append(1)  # runs only while tracing
    return model.apply(variables, x, train=False)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *spec.input_shape)), jnp.float32)
  masks = {**variables["masks"], "stage2": variables["masks"]["stage2"].at[:5].set(0.0)}
  four = jnp.asarray(4, jnp.int32)
  quant = jax.tree.map(lambda b: b, variables["quant"])
  quant["stage2_block0"]["conv1"] = {"w_bits": four, "a_bits": four}
  quant["head"] = {**quant["head"], "w_bits": four}

  outputs = [apply(variables, x),
             apply({**variables, "masks": masks}, x),
             apply({**variables, "quant": quant}, x),
             apply({**variables, "masks": masks, "quant": quant}, x)]

  assert len(traces) == 1
  assert apply._cache_size() == 1
  for a, b in zip(outputs, outputs[1:]):
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-4  # each change is seen
