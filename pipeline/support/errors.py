"""The errors a user can cause. Each message names the problem and the fix; the CLI prints it in
one line (exit code 2) instead of a traceback."""
from __future__ import annotations

from typing import Callable

from mcci_models import ModelError
from shards.errors import ShardBuildError


class ConfigError(ValueError):
    """A configuration key, value or file that cannot be used."""


class ShardError(ValueError):
    """A shard folder (or URL) that cannot be read as asked."""


class CheckpointError(ValueError):
    """A saved model or training state that cannot be used."""


class JobError(ValueError):
    """A job asked to do what its inputs do not allow (a model without a reference, an output that exists...)."""


USER_ERRORS = (ConfigError, ShardError, CheckpointError, JobError, ShardBuildError, ModelError, FileNotFoundError)


# What the running command has finished and kept, by what it is (a run's checkpoint, an experiment's stages), said in
# the one line an interrupt ends with. A note may be a function, asked at that moment, so that it says what is on
# disk then (a signal can arrive between a checkpoint's write and any note made after it). A command that writes its
# outputs only when complete notes nothing.
_KEPT: dict[str, str | Callable[[], str | None]] = {}


def note_kept(what: str, note: str | Callable[[], str | None]) -> None:
    """Record (or replace) what ``what`` has kept so far: a line, or a function giving it (None: nothing yet)."""
    _KEPT[what] = note


def kept_notes() -> list[str]:
    notes = [note() if callable(note) else note for note in _KEPT.values()]
    return [note for note in notes if note]


def forget_kept() -> None:
    _KEPT.clear()
