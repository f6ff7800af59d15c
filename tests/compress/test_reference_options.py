"""The reference's numerics as options: activation placement, the search split."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from picpq_jax import data as pdata
from picpq_jax import models
from picpq_jax.compress import bits as bits_lib
from picpq_jax.compress.config import CompressConfig
from picpq_jax.compress.pipeline import search_split, val_size
from picpq_jax.errors import UserError
from picpq_jax.models.quantizer import FullPrecision


@dataclasses.dataclass(frozen=True)
class Recorder(FullPrecision):
  """Records the bit-width of every activation it is asked to quantize (eager only)."""
  calls: list = dataclasses.field(default_factory=list, hash=False, compare=False)

  def activations(self, x, bits, qparams):
    if not isinstance(bits, jax.core.Tracer):  # init is jitted; the test applies eagerly
      self.calls.append((x.shape, int(bits)))
    return x


def test_inner_placement_quantizes_only_each_blocks_inner_activation():
  """ResNet-8 (one block per stage): with the reference placement only each block's
  conv2 input (after bn1/ReLU) is quantized, at its conv1's bits; the image, block
  inputs, the residual stream and the classifier input stay full precision."""
  model = models.get_model("resnet8", quantizer=Recorder())
  structure = models.model_structure(model, (32, 32, 3))
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  w_bits = {l.name: 3 + i % 5 for i, l in enumerate(structure.layers)}  # distinct per layer
  quant = traverse_util.unflatten_dict(
      {f"{n}/{k}": jnp.int32(b) for n, b in w_bits.items() for k in ("w_bits", "a_bits")},
      sep="/")
  inner = bits_lib.inner_activation_quant(structure, quant)
  recorder = model.quantizer
  recorder.calls.clear()
  model.apply({**variables, "quant": inner}, jnp.ones((2, 32, 32, 3)))
  quantized = [(shape, b) for shape, b in recorder.calls if b < 32]
  # Hand-worked: stage s's block0/conv2 reads a [2, H, H, C] map at conv1's bits.
  expected = [((2, 32, 32, 16), w_bits["stage1_block0/conv1"]),
              ((2, 16, 16, 32), w_bits["stage2_block0/conv1"]),
              ((2, 8, 8, 64), w_bits["stage3_block0/conv1"])]
  assert quantized == expected
  assert len(recorder.calls) == len(structure.layers)  # every layer asked, 32 bits elsewhere
  flat = traverse_util.flatten_dict(inner, sep="/")
  for name, b in w_bits.items():  # weights keep their bits
    assert int(flat[f"{name}/w_bits"]) == b


def test_search_split_is_carved_from_training_data_disjoint_from_validation():
  n = 200  # image i holds the value i: the sets are compared by it
  ds = pdata.ImageDataset(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(3, -1),
                          np.arange(n, dtype=np.int32) % 10, tuple(str(i) for i in range(10)))
  train, val = pdata.train_val_split(ds, 40, 0)
  config = CompressConfig(checkpoint="x", search_val_size=20, seed=3)
  rest, search = search_split(train, config)
  key = lambda d: set(d.images[:, 0, 0, 0].tolist())
  assert (len(rest), len(search), len(val)) == (140, 20, 40)
  assert not key(search) & key(val) and not key(search) & key(rest)
  assert key(search) | key(rest) == key(train)
  # The reference's 5,000 is capped at a fifth of the training data.
  assert len(search_split(train, dataclasses.replace(config, search_val_size=5000))[1]) == 32


def test_val_size_defaults_to_the_checkpoints_and_can_be_smaller():
  meta = {"val_size": 5000}
  assert val_size(CompressConfig(checkpoint="x"), meta) == 5000
  assert val_size(CompressConfig(checkpoint="x", val_size=500), meta) == 500
  with pytest.raises(UserError, match="--val-size=-1"):
    CompressConfig(checkpoint="x", val_size=-1)
