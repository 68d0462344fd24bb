"""The one error type the command line turns into a one-line message."""


class LorakitError(Exception):
    """A problem with the user's input or run (bad data, missing model, diverged loss).

    `lorakit` prints `error: <message>` and exits with status 2 instead of a traceback.
    """
