"""Errors the CLI turns into a one-line message and exit status 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class WeightsUnavailable(UserError):
    """Pretrained weights for a backbone cannot be had; never train from scratch silently."""
