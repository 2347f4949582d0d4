"""The one exception type for mistakes a user can fix (config, data, flags, checkpoints).

main.py prints these as a message, never as a traceback: the message must name the field or
file at fault and say what to do about it.
"""


class NeoError(Exception):
    """A user-fixable problem; its message names the culprit and the fix."""
