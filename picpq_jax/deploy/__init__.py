"""Deployment: the compacted, quantized model for an edge runtime, and reading it back.

* :func:`build_onnx` / :func:`export_onnx`: an ONNX graph with integer weights
  and activations through QuantizeLinear/DequantizeLinear at the plan's
  bit-widths (needs the ``[deploy]`` extra: ``onnx``; running it, ``onnxruntime``).
* :func:`export_stablehlo` / :func:`load_stablehlo`: a ``jax.export`` artifact,
  the form that needs nothing beyond JAX.
"""

from picpq_jax.deploy.onnx_export import build_onnx
from picpq_jax.deploy.onnx_export import export_onnx
from picpq_jax.deploy.onnx_export import quantized_kernel
from picpq_jax.deploy.stablehlo import export_stablehlo
from picpq_jax.deploy.stablehlo import load_stablehlo
from picpq_jax.deploy.stablehlo import stablehlo_function

__all__ = (
    "build_onnx",
    "export_onnx",
    "export_stablehlo",
    "load_stablehlo",
    "quantized_kernel",
    "stablehlo_function",
)
