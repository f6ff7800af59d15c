"""Every public name of picpq_jax.csi resolves (they load lazily)."""

import pytest

from picpq_jax import csi


@pytest.mark.parametrize("name", csi.__all__)
def test_public_name_resolves(name):
  assert getattr(csi, name) is not None


def test_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError):
    csi.no_such_name  # noqa: B018
