"""The public surface of picpq_jax.data imports and is complete."""

import picpq_jax.data as data


def test_every_public_name_imports():
  for name in data.__all__:
    assert getattr(data, name) is not None, name


def test_public_names_are_sorted_and_unique():
  assert len(set(data.__all__)) == len(data.__all__)
  assert list(data.__all__) == sorted(data.__all__)


def test_importing_does_not_import_tensorflow_datasets():
  import subprocess
  import sys
  code = ("import sys, picpq_jax.data; "
          "assert 'tensorflow_datasets' not in sys.modules; "
          "assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)
