"""User-facing errors: each carries one clear sentence, printed without a traceback by the CLI."""


class TabshardError(Exception):
    """Base for mistakes a user can fix (bad model file, bad argument, bad config)."""


class ModelError(TabshardError):
    """The model file is missing, truncated, or not something we can run."""


class ConfigError(TabshardError):
    """A setting has a value that is not allowed."""
