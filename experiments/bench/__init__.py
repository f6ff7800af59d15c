"""Benchmarks of picpq-jax against PyTorch (issue 5): ``python -m experiments.bench``.

One module per workload (``compile_time``, ``step_time``, ``hrank``, ``evolution``,
``compacted``), each with ``run(config) -> dict`` that prints a table and returns
the JSON result; ``torch_models`` holds the PyTorch twins of the library's models.
See ``RESULTS.md`` for the latest numbers and the commands that produced them.
"""
