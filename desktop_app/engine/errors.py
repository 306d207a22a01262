"""Errors a user can cause. Their message is one sentence: what is wrong and what to do."""


class WorkbenchError(Exception):
    """A user-facing error; str(err) is the one-line message shown in the window and on the CLI."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class ModelLoadError(WorkbenchError):
    pass


class PromptError(WorkbenchError):
    pass


class SpecError(WorkbenchError):
    """An analysis specification that cannot run (unknown kind, missing field, value out of range)."""


class SAEError(WorkbenchError):
    pass


class ProjectFileError(WorkbenchError):
    pass


class OutOfMemory(WorkbenchError):
    pass


class ConformanceError(WorkbenchError):
    """An analysis refused because a load-time conformance check it depends on failed for this model."""


class JobCancelled(Exception):
    """Raised inside a job (also from inside a forward hook) when its cancel token is set."""
