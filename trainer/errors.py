"""The one exception type for user mistakes (bad config key, bad path, missing checkpoint,
NaN loss): the CLI prints its message on one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A problem the user can fix; str(err) is the whole message."""
