"""The errors a user can cause. Each message names the problem and the fix; the CLI prints it in
one line (exit code 2) instead of a traceback."""
from __future__ import annotations

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
