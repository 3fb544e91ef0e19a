"""The error of the Hugging Face tools that the user can fix (exit code 2 from the CLIs)."""

__all__ = ["ExportError"]


class ExportError(RuntimeError):
    """A user error (bad path, wrong flavor, existing output, ...): the message says what to fix."""
