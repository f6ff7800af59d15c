"""The notebooks under experiments/notebooks run, at their CI size, from their sources.

Each jupytext source (``.py``, percent format) is executed in a fresh IPython kernel
with ``PICPQ_NOTEBOOK_SIZE=ci``; its rendered ``.ipynb`` must hold the same cells.
"""

import ast
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "experiments" / "notebooks"


def _run(name: str, monkeypatch) -> str:
  """Executes ``name``.py; returns the text its cells printed."""
  monkeypatch.setenv("PICPQ_NOTEBOOK_SIZE", "ci")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", ["bring_your_own_model", "picpq_step_by_step"])
def test_rendered_notebook_matches_its_source(name):
  source = jupytext.read(NOTEBOOKS / f"{name}.py")
  rendered = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
  assert [(c.cell_type, c.source) for c in rendered.cells] == [
      (c.cell_type, c.source) for c in source.cells]


def _value(printed: str, label: str):
  line = next(line for line in printed.splitlines() if line.startswith(label))
  return ast.literal_eval(line[len(label):].strip())


def test_bring_your_own_model_is_compressed_end_to_end(monkeypatch):
  printed = _run("bring_your_own_model", monkeypatch)
  sizes = _value(printed, "compacted group sizes:")
  k1, k2 = sizes["c1"], sizes["c2"]
  assert 1 <= k1 <= 16 and 1 <= k2 <= 32 and k1 + k2 < 48  # pruned to half the FLOPs
  # weights, hand-counted: conv1 3x3x3xk1, bn1 2k1, conv2 3x3xk1xk2, bn2 2k2, head k2x10 + 10
  assert _value(printed, "compacted params:") == (27 * k1 + 2 * k1 + 9 * k1 * k2 + 2 * k2
                                                  + 10 * k2 + 10)
  assert _value(printed, "largest logit difference, compacted vs masked:") < 1e-4


def test_step_by_step(monkeypatch):
  printed = _run("picpq_step_by_step", monkeypatch)
  assert "top-1 agreement with the masked model 1.000" in printed
  assert "loaded file top-1 agreement 1.000" in printed
  if "ONNX file" in printed:  # with the [deploy] extra
    # not 1.0: a fake-quantized value within float rounding of a level boundary may land
    # on the other level in onnxruntime (98.6% on the 500 images at full size, not
    # fine-tuned; 99.78% after picpq compress, experiments/deploy)
    assert float(printed.split("top-1 agreement with JAX ")[1].split()[0]) >= 0.95
