"""The one error type that means "the user's input is wrong". A leaf: it imports nothing of ours.

Each module defines its own subclass where the problem is found (`DataError`, `MergeError`, ...). The CLI
prints any `UserError` as one line and exits 2, so no list of error types has to be kept anywhere.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the field, file or path and says how."""

    def lines(self) -> list[str]:
        """What the CLI prints, one item a line (a recipe may have several problems at once)."""
        return [f"error: {self}"]


class NonFiniteError(UserError):
    """The loss or gradient norm became NaN/inf and train.on_nan is stop (the message names the step)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped training at a step boundary after a checkpoint. Not an error: the CLI exits 0."""
