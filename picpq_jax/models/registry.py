"""Models by name, and their variables."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax import compile_options
from picpq_jax.errors import UserError
from picpq_jax.models.quantizer import FullPrecision, Quantizer
from picpq_jax.models.mobilenetv2 import MobileNetV2
from picpq_jax.models.resnet_cifar import CifarResNet
from picpq_jax.models.resnet_imagenet import ImageNetResNet
from picpq_jax.models.vgg import CifarVGG


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build a named model and what input it expects."""

  build: Callable[..., nn.Module]  # build(num_classes=..., quantizer=...) -> module
  input_shape: tuple[int, int, int]  # one example, NHWC without N
  num_classes: int  # the dataset it was published for


MODELS: dict[str, ModelSpec] = {
    **{f"resnet{d}": ModelSpec(functools.partial(CifarResNet, depth=d), (32, 32, 3), 10)
       for d in (8, 20, 32, 44, 56, 110)},  # resnet8: tiny, for quick runs and tests
    "vgg16": ModelSpec(CifarVGG, (32, 32, 3), 10),
    "mobilenetv2": ModelSpec(MobileNetV2, (32, 32, 3), 10),
    "resnet18": ModelSpec(
        functools.partial(ImageNetResNet, stage_sizes=(2, 2, 2, 2)), (224, 224, 3), 1000),
}


def get_spec(name: str) -> ModelSpec:
  """The :class:`ModelSpec` of ``name``, or a UserError listing the known names."""
  try:
    return MODELS[name]
  except KeyError:
    raise UserError(
        f"unknown architecture {name!r}: choose one of {', '.join(sorted(MODELS))}") from None


DTYPES = ("float32", "bfloat16")


def get_model(name: str, num_classes: int | None = None,
              quantizer: Quantizer = FullPrecision(), dtype: str = "float32") -> nn.Module:
  """Builds the named model (an unbound Flax module).

  ``dtype``: computation dtype of its conv and dense products, one of :data:`DTYPES`
  (``"bfloat16"``: mixed precision, the parameters stay float32).
  """
  spec = get_spec(name)
  if dtype not in DTYPES:
    raise UserError(f"unknown compute dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
  if dtype == "bfloat16":
    compile_options.warn_if_bf16_emulated()
  return spec.build(num_classes=num_classes or spec.num_classes, quantizer=quantizer,
                    dtype=dtype)


def init_variables(model: nn.Module, key: jax.Array,
                   input_shape: tuple[int, ...]) -> dict:
  """Initial variables: ``{"params", "batch_stats", "masks", "quant"}``.

  Args:
    model: a library model.
    key: PRNG key for the parameter initializers.
    input_shape: one example, ``(H, W, C)``.
  """
  x = jnp.zeros((1, *input_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(key, x)
  return dict(variables)
