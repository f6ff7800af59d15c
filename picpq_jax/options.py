"""Helpers for the frozen config dataclasses behind each ``picpq`` command.

A field made with :func:`option` carries its ``--help`` text (and optionally its
command-line flags) in ``metadata``; ``picpq_jax.cli`` turns the fields into
arguments. :func:`check` gives the one-line error every command uses for a value
out of range.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence

from picpq_jax.errors import UserError


def option(default: Any, help: str, flags: Sequence[str] = (),  # pylint: disable=redefined-builtin
           may_change: bool = False) -> Any:
  """A dataclass field whose ``metadata`` holds its ``--help`` text and flags.

  ``flags`` overrides the default ``--field-name`` spelling (e.g. ``("--from",)``).
  ``may_change``: ``--resume`` accepts another value than the run's (where and how it
  reports, how long it runs); every other field must match (see
  :func:`picpq_jax.engine.open_workdir`).
  """
  return dataclasses.field(default=default, metadata={
      "help": help, "flags": tuple(flags), "may_change": may_change})


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
  """UserError naming the option, its value and the allowed range unless ``ok``."""
  if not ok:
    raise UserError(f"--{field.replace('_', '-')}={value!r} is out of range: use {allowed}")


def add_config_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
  """One ``--option`` per field of ``config_cls``, help from ``metadata["help"]``."""
  hints = typing.get_type_hints(config_cls)
  for field in dataclasses.fields(config_cls):
    flags = field.metadata.get("flags") or ("--" + field.name.replace("_", "-"),)
    hint = hints[field.name]
    if isinstance(hint, types.UnionType):
      hint = next(a for a in typing.get_args(hint) if a is not type(None))
    help_text = field.metadata.get("help", "").replace("%", "%%")
    if hint is bool:
      parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction,
                          default=field.default, help=help_text)
    else:
      parser.add_argument(*flags, dest=field.name, type=hint, default=field.default,
                          help=help_text, metavar=field.name.upper())


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
  """The config dataclass built (and validated) from parsed arguments."""
  return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
