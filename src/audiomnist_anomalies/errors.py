"""Exception types that the stages report to the user as one clear line."""


class PipelineError(Exception):
    """Base class for errors caused by input, parameters or environment.

    Stages catch it at the entry point and print its message without a
    traceback, because it describes a problem the user can fix.
    """


class ParameterError(PipelineError):
    """A value in ``params.yaml`` has the wrong type, range or name."""


class AudioInputError(PipelineError):
    """A file cannot be read as a usable audio recording."""


class DownloadError(PipelineError):
    """The data set could not be downloaded or failed verification."""
