"""Models by name."""

from __future__ import annotations

import pytest

from picpq_jax.errors import UserError
from picpq_jax.models import MODELS, get_model, get_spec

REGISTERED = {  # name -> (input shape, classes)
    "resnet20": ((32, 32, 3), 10), "resnet56": ((32, 32, 3), 10),
    "vgg16": ((32, 32, 3), 10), "mobilenetv2": ((32, 32, 3), 10),
    "resnet18": ((224, 224, 3), 1000),
}


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered(name):
  spec = get_spec(name)
  assert (spec.input_shape, spec.num_classes) == REGISTERED[name]
  assert get_model(name).num_classes == spec.num_classes


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(UserError) as info:
    get_model("nope")
  message = str(info.value)
  assert "'nope'" in message
  for name in MODELS:
    assert name in message
