"""The one exception type the command line turns into a single clear error line."""


class PipelineError(Exception):
    """A user-facing failure: bad input, bad config, or an artifact that does not match its contract.

    The message must name the file, tensor or key at fault and what was expected; the CLI prints it as one line
    (no traceback) and exits non-zero.
    """
