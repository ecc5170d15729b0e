"""One exception type for bad input.

The runner turns an ``OdmoeError`` into one line on stderr and exit code 2, so every message
must name the problem and the fix.
"""


class OdmoeError(Exception):
    """Bad input or an impossible request; the message says what is wrong and how to fix it."""
