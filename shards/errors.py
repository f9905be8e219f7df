"""The one error type for bad user input while building shards: its message names the fix."""


class ShardBuildError(ValueError):
    pass
