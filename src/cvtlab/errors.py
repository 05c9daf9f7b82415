"""The one exception type cvtlab raises for user mistakes.

The CLI prints these as a single line (no traceback); library users catch them as ``ValueError``.
"""


class CvtLabError(ValueError):
    """A problem with the user's input: a name, a file, a flag or a value."""
