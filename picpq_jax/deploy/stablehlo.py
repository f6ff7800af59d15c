"""``jax.export`` StableHLO artifact: the deployable model with no extra dependency.

:func:`export_stablehlo` serializes one function, ``images -> logits``, with the
model's variables folded in as constants: input uint8 ``[N, H, W, C]`` (``N``
symbolic, any batch), normalization ``(x / 255 - mean) / std`` inside, output
float32 ``[N, K]``. A kernel with ``w_bits < 32`` is stored as its integer codes
(int8 up to 8 bits, as :func:`~picpq_jax.deploy.onnx_export.quantized_kernel`
finds them) and one float32 scale, dequantized inside the function; activations
are quantized by the model's own quantizer, so the artifact computes what the
fake-quantized JAX model computes. :func:`load_stablehlo` reads it back with
``jax.export.deserialize``: any JAX (of a compatible serialization version) can
run it, on the platforms it was lowered for, without picpq_jax.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from picpq_jax.compress.export import Prequantized
from picpq_jax.data.pipeline import normalize
from picpq_jax.deploy import onnx_export
from picpq_jax.errors import UserError
from picpq_jax.models.quantizer import FullPrecision

PLATFORMS = ("cpu", "cuda", "tpu")


def _integer_variables(model: nn.Module, variables: Mapping[str, Any]
                       ) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, Any]]]:
  """``(floats, kernels)``: the flat variables without quantized kernels, and those
  kernels as ``{path: (codes, float32 scale)}``."""
  flat = {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(dict(variables), sep="/").items()}
  ctx = onnx_export.Context(flat, model.quantizer, {})
  kernels = {}
  for path in flat:
    if path.startswith("quant/") and path.endswith("/w_bits"):
      layer = path[len("quant/"):-len("/w_bits")]
      quantized = onnx_export.quantized_kernel(ctx, layer)
      if quantized is not None:
        kernels[f"params/{layer}/kernel"] = quantized
  floats = {k: v for k, v in flat.items() if k not in kernels}
  return floats, kernels


def stablehlo_function(model: nn.Module, variables: Mapping[str, Any], mean, std
                       ) -> Callable[[jax.Array], jax.Array]:
  """``images uint8 [N, H, W, C] -> logits float32 [N, K]`` with the variables held as
  constants (quantized kernels as integer codes times a scale)."""
  floats, kernels = _integer_variables(model, variables)
  quantizer = model.quantizer or FullPrecision()
  base = quantizer.base if isinstance(quantizer, Prequantized) else quantizer
  runner = model.clone(quantizer=Prequantized(base)) if kernels else model
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def predict(images: jax.Array) -> jax.Array:
    flat = {k: jnp.asarray(v) for k, v in floats.items()}
    for path, (codes, scale) in kernels.items():
      flat[path] = jnp.asarray(codes).astype(jnp.float32) * jnp.float32(scale)
    restored = traverse_util.unflatten_dict(flat, sep="/")
    return runner.apply(restored, normalize(images, mean, std), train=False)

  return predict


def export_stablehlo(path: str | os.PathLike, model: nn.Module, variables: Mapping[str, Any],
                     mean, std, input_shape: tuple[int, int, int] = (32, 32, 3),
                     platforms: Sequence[str] | None = PLATFORMS) -> int:
  """Serializes :func:`stablehlo_function` with ``jax.export`` to ``path``.

  Args:
    path: the file to write (``.stablehlo`` by convention); replaced atomically.
    model, variables: a model of :mod:`picpq_jax.models` (compacted or not) and
      its variables; quantized kernels must lie on a uniform grid through zero.
    mean, std: float ``[C]`` normalization, ``[0, 1]`` units.
    input_shape: one image, ``(H, W, C)``; the batch is symbolic.
    platforms: lowering platforms (default :data:`PLATFORMS`: one artifact runs on
      CPU, CUDA and TPU).

  Returns:
    The file's size in bytes.
  """
  function = jax.jit(stablehlo_function(model, variables, mean, std))
  batch, = jax.export.symbolic_shape("N")
  spec = jax.ShapeDtypeStruct((batch, *input_shape), jnp.uint8)
  exported = jax.export.export(function, platforms=platforms)(spec)
  return onnx_export.write_file(path, exported.serialize())


def load_stablehlo(path: str | os.PathLike) -> jax.export.Exported:
  """The ``jax.export.Exported`` in ``path``; call it with ``.call(images)``."""
  try:
    with open(path, "rb") as f:
      data = bytearray(f.read())
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror}); pass a file `picpq export` wrote"
                    ) from None
  try:
    return jax.export.deserialize(data)
  except Exception:  # pylint: disable=broad-except  # flatbuffers raises struct.error etc.
    raise UserError(f"{path} is not a jax.export artifact (or one this JAX cannot read); "
                    "export it again") from None
