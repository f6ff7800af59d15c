"""The jax.export artifact: the compacted model's logits at any batch size, kernels
stored as integer codes, lowered for CPU, CUDA and TPU; no onnx needed."""

from __future__ import annotations

import numpy as np
import pytest

from picpq_jax.compress.quantizers import DoReFa
from picpq_jax.data import normalize
from picpq_jax.deploy.stablehlo import PLATFORMS, export_stablehlo, load_stablehlo
from picpq_jax.errors import UserError
from picpq_jax.models import get_model
from tests.deploy.helpers import compacted


def test_round_trip_at_two_batch_sizes(tmp_path, images):
  x, mean, std = images
  model, variables = compacted(get_model("resnet8", quantizer=DoReFa()), seed=2)
  expected = np.asarray(model.apply(variables, normalize(x, mean, std)))
  path = tmp_path / "model.stablehlo"
  size = export_stablehlo(path, model, variables, mean, std)
  assert size == path.stat().st_size
  exported = load_stablehlo(path)
  assert tuple(exported.platforms) == PLATFORMS
  for n in (16, 3):
    got = np.asarray(exported.call(x[:n]))
    np.testing.assert_allclose(got, expected[:n], rtol=1e-5, atol=1e-5)


def test_quantized_kernels_are_stored_as_int8(tmp_path, images):
  """The quantized model's artifact holds int8 constants and is smaller than the
  same compacted model's at 32 bits by about 3 bytes per quantized weight."""
  _, mean, std = images
  quantized = compacted(get_model("resnet8", quantizer=DoReFa()), seed=2)
  full = compacted(get_model("resnet8", quantizer=DoReFa()), seed=2, quantize=False)
  sizes = [export_stablehlo(tmp_path / f"{i}.stablehlo", *m, mean, std, platforms=("cpu",))
           for i, m in enumerate((quantized, full))]
  module = load_stablehlo(tmp_path / "0.stablehlo").mlir_module()
  assert "xi8>" in module
  weights = sum(v.size for k, v in _kernels(quantized[1]).items()
                if k not in ("stem_conv", "head"))
  assert sizes[1] - sizes[0] > 2.5 * weights


def test_unreadable_file_is_a_user_error(tmp_path):
  path = tmp_path / "bad.stablehlo"
  path.write_bytes(b"not an artifact")
  with pytest.raises(UserError, match="export it again"):
    load_stablehlo(path)


def _kernels(variables) -> dict:
  out = {}
  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}/")
      elif k == "kernel":
        out[prefix.split("/")[0]] = np.asarray(v)
  walk(variables["params"], "")
  return out
