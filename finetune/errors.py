"""The error types that mean "the user's input is wrong", which the CLI prints as one line (no traceback)."""

from finetune.checkpoints import CheckpointError
from finetune.data import DataError
from finetune.evaluate.tasks import EvalError
from finetune.export import ExportError
from finetune.lock import LockedError
from finetune.merge import MergeError
from finetune.models import ModelSourceError
from finetune.pipeline import PipelineError
from finetune.plan import PlanError
from finetune.recipe import RecipeError
from finetune.resume import ResumeError
from finetune.train import RunDirError


class NonFiniteError(Exception):
    """The loss or gradient norm became NaN/inf and train.on_nan is stop (the message names the step)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped training at a step boundary after a checkpoint. Not an error: the CLI exits 0."""


USER_ERRORS: tuple[type[Exception], ...] = (RecipeError, DataError, ModelSourceError, RunDirError, CheckpointError,
                                            LockedError, ResumeError, NonFiniteError, EvalError, PipelineError,
                                            MergeError, ExportError, PlanError)
