"""Compacted, quantized test models with a plan's mixed bit-widths."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from picpq_jax.compress.compact import compact, zero_pruned_weights
from picpq_jax.models import model_structure
from tests.compress.test_compact import _random_masks
from tests.compress.test_export import _initial_qparams
from tests.models.conftest import random_variables

BITS = (2, 3, 4, 5, 6, 8)


def plan_bits(quant, full=("stem_conv", "head")):
  """Every layer but ``full`` at a bit-width from :data:`BITS` (by position), w == a."""
  leaves = jax.tree_util.tree_leaves_with_path(quant)
  layers = sorted({"/".join(k.key for k in path[:-1]) for path, _ in leaves})
  chosen = {l: 32 if l.split("/")[0] in full else BITS[i % len(BITS)]
            for i, l in enumerate(layers)}
  return jax.tree_util.tree_map_with_path(
      lambda p, _: jnp.asarray(chosen["/".join(k.key for k in p[:-1])], jnp.int32), quant)


def compacted(model, seed: int, quantize: bool = True):
  """``model`` with random variables, random channels pruned, bits from
  :func:`plan_bits` (all 32 unless ``quantize``), compacted: ``(small, variables)``."""
  structure = model_structure(model, (32, 32, 3))
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = random_variables(jax.eval_shape(model.init, jax.random.key(0), x), seed)
  variables["params"] = _initial_qparams(variables["params"], model.quantizer)
  if quantize:
    variables["quant"] = plan_bits(variables["quant"])
  variables["masks"] = _random_masks(structure, seed)
  variables = zero_pruned_weights(variables, structure)
  return compact(model, variables, structure)
