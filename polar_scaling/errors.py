"""Errors that end a run with a message naming the cause (the CLI exits non-zero)."""


class StageError(RuntimeError):
    """A run cannot proceed (bad data, NaN loss, foreign run dir); the message names the cause."""


class Preempted(Exception):
    """The run saved a checkpoint after a stop signal and exits; relaunching resumes it."""
