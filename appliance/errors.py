"""One error hierarchy for failures a user can act on.

Every message is one sentence: what happened, where (file, line, field, id),
and what to do. The CLI prints it to stderr and exits non-zero; nothing that
raises one of these shows a traceback.
"""


class ApplianceError(Exception):
    """A failure the user can understand and fix; the message says how."""

    exit_code = 2


class NotFound(ApplianceError):
    """A file, model, dataset or run that was named does not exist."""


class InvalidInput(ApplianceError):
    """A file, recipe or argument is malformed."""


class CheckFailed(ApplianceError):
    """A self-check of an artifact (parity, template, manifest) failed."""

    exit_code = 3


class StageFailed(ApplianceError):
    """A long-running stage (training, export) ended in failure."""

    exit_code = 4
