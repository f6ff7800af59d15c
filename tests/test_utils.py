"""The neutral helpers: plots without pyplot, and imports that leave others alone."""

import subprocess
import sys

from picpq_jax.utils import figure, format_table, tree_bytes

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_importing_commands_loads_neither_matplotlib_nor_the_cli():
  script = ("import sys, picpq_jax.compress, picpq_jax.federated.command, "
            "picpq_jax.finetune.command, picpq_jax.deploy.command, picpq_jax.engine; "
            "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'picpq_jax.cli'))))")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"


def test_figure_writes_a_png_without_pyplot(tmp_path):
  fig = figure(figsize=(2, 2))
  fig.subplots().plot([0, 1], [1, 0])
  fig.savefig(tmp_path / "p.png")
  assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_small_helpers():
  import numpy as np
  assert tree_bytes({"a": np.zeros((2, 3), np.float32), "b": [np.zeros(4, np.int8)]}) == 28
  assert format_table([("a", 1234), ("bb", 0.5)]) == "a   1,234\nbb  0.5000"
