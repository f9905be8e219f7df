"""Errors of the shard builder. ``ShardBuildError`` is bad user input: its message names the fix."""
import signal


class ShardBuildError(ValueError):
    pass


class Interrupted(KeyboardInterrupt):
    """A build stopped by a signal (SIGTERM raised like Ctrl-C, so the same cleanup runs)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
