"""Errors caused by the user's data or config. Entry points print their message (which names the file or key and
the fix) without a traceback and exit with status 1; anything else is a bug and keeps its traceback."""


class UserError(RuntimeError):
    pass


class ConfigError(UserError, ValueError):
    """A config value or argument that cannot work; the message names the key and valid choices."""
