"""Renders the notebooks: executes each jupytext source and writes its ``.ipynb`` beside it.

  python experiments/notebooks/render.py                 # full size, outputs kept
  PICPQ_NOTEBOOK_SIZE=ci python experiments/notebooks/render.py bring_your_own_model
"""

from __future__ import annotations

import os
import sys

import jupytext
import nbclient

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = ("picpq_step_by_step", "bring_your_own_model", "federated_split_training",
             "finetune_memory")


def render(name: str) -> str:
  """Executes ``<name>.py`` in a fresh kernel; writes and returns ``<name>.ipynb``."""
  notebook = jupytext.read(os.path.join(HERE, f"{name}.py"))
  nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                          resources={"metadata": {"path": HERE}}).execute()
  path = os.path.join(HERE, f"{name}.ipynb")
  jupytext.write(notebook, path)
  return path


if __name__ == "__main__":
  os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  for arg in sys.argv[1:] or NOTEBOOKS:
    print(render(arg))
