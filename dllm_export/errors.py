"""The one error type a user sees.

Library code raises ``DllmExportError`` with a message that names the file or field and the
fix; ``cli.py`` prints it as one line and exits non-zero. Any other exception is a bug.
"""


class DllmExportError(Exception):
    """A problem with the user's input or environment, stated as one actionable line."""
