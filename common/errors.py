"""The one exception type for bad user input, shared by every package and command line."""


class InputError(ValueError):
    """Bad input from a user: a file, a size, a config value.

    The message names the problem and the fix; command lines print it as one line and exit 2.
    """
