"""Per-stage wall times of `picpq compress` (stage_seconds.json and the report table)."""

import json

from picpq_jax.compress import pipeline
from picpq_jax.compress.report import stage_seconds_table


def test_saved_stages_sum_over_runs_and_repeated_parts_are_replaced(tmp_path, monkeypatch):
  ticks = iter([0.0, 2.0, 5.0, 5.5,        # run 1: setup 2, baseline 3, then genes 0.5
                100.0, 101.0, 101.25, 104.0])  # run 2 (resumed): setup 1, genes +0.25, export 2.75
  monkeypatch.setattr(pipeline.time, "perf_counter", lambda: next(ticks))
  clock = {"stage": "setup", "start": pipeline.time.perf_counter()}
  for stage in ("baseline", "genes", None):
    pipeline._lap(str(tmp_path), clock, stage)
  clock = {"stage": "setup", "start": pipeline.time.perf_counter()}
  for stage in ("genes", "export", None):
    pipeline._lap(str(tmp_path), clock, stage)
  saved = json.loads((tmp_path / pipeline.SECONDS_FILE).read_text())
  assert saved == {"setup": 1.0, "baseline": 3.0, "genes": 0.75, "export": 2.75}

  pipeline._remove_stages(str(tmp_path), "genes")  # a redone stage starts again
  assert json.loads((tmp_path / pipeline.SECONDS_FILE).read_text()) == {
      "setup": 1.0, "baseline": 3.0, "export": 2.75}


def test_stage_seconds_table_hand_worked():
  lines = stage_seconds_table({"setup": 1.0, "genes": 6.0, "qat": 3.0})
  assert lines[1:] == ["| stage | wall time (s) | share |", "|---|---|---|",
                       "| setup (model and data loaded) | 1.0 | 10% |",
                       "| (a, b) search | 6.0 | 60% |",
                       "| quantization-aware training | 3.0 | 30% |",
                       "| total | 10.0 | |"]
  assert stage_seconds_table({}) == []
