"""The one error type a user sees.

Library code raises ``DllmExportError`` with a message that names the file or field and the
fix; ``cli.py`` prints it as one line and exits non-zero. Any other exception is a bug.
"""


class DllmExportError(Exception):
    """A problem with the user's input or environment, stated as one actionable line."""


def check_at_least(flag: str, value, low: int = 1, high: int = 1 << 20):
    """``value`` (None passes) must be an integer in [low, high]; one line naming ``flag``."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DllmExportError(f"{flag} {value!r}: must be an integer from {low} to {high}")
    return value
