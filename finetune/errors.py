"""The error types that mean "the user's input is wrong", which the CLI prints as one line (no traceback)."""

from finetune.data import DataError
from finetune.evaluate.tasks import EvalError
from finetune.export import ExportError
from finetune.merge import MergeError
from finetune.models import ModelSourceError
from finetune.pipeline import PipelineError
from finetune.recipe import RecipeError
from finetune.train import RunDirError

USER_ERRORS: tuple[type[Exception], ...] = (RecipeError, DataError, ModelSourceError, RunDirError, EvalError,
                                            PipelineError, MergeError, ExportError)
