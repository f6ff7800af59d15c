"""The bundled text sample: what `picpq finetune` reads by default."""

from pathlib import Path

from picpq_jax.finetune.config import FinetuneConfig
from picpq_jax.finetune.text import sst2_paths, tinyshakespeare_path
from tests.conftest import SHARED_DATA, require


def _rows(path: Path) -> tuple[str, list[tuple[str, str]]]:
  header, *lines = path.read_text(encoding="utf-8").splitlines()
  return header, [tuple(line.rsplit("\t", 1)) for line in lines]


def test_default_data_is_the_embedded_sample():
  assert FinetuneConfig().data == "embedded"
  paths = sst2_paths("embedded")
  for path, per_label in ((paths.train, 256), (paths.dev, 200)):
    header, rows = _rows(path)
    assert header == "sentence\tlabel"
    labels = [label for _, label in rows]
    assert {label: labels.count(label) for label in set(labels)} == {"0": per_label,
                                                                      "1": per_label}
  assert path.stat().st_size < 100_000
  text = tinyshakespeare_path("embedded").read_text(encoding="utf-8")
  assert len(text) == 100_000 and text.startswith("First Citizen:")


def test_sample_lines_are_lines_of_the_full_files():
  shared = require(SHARED_DATA)
  paths = sst2_paths("embedded")
  for name in ("train.tsv", "dev.tsv"):
    full = set(_rows(shared / "sst2" / name)[1])
    assert set(_rows(getattr(paths, name[:-4]))[1]) <= full
  shakespeare = (require(shared / "text/tinyshakespeare.txt")).read_text(encoding="utf-8")
  assert shakespeare.startswith(tinyshakespeare_path("embedded").read_text(encoding="utf-8"))
