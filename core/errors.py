"""The one exception type a user sees: a message that names the problem and the fix."""


class NFMError(Exception):
    """Bad input or state a person can act on. The CLI prints it without a traceback."""
