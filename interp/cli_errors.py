"""The command line's own error: :func:`interp.cli.main` prints it as one line (no traceback)."""


class CLIError(Exception):
    """A problem to report in one line (no traceback)."""


__all__ = ["CLIError"]
