"""The one exception type for mistakes a user can fix (config, data, flags, checkpoints).

main.py prints these as a message, never as a traceback: the message must name the field or
file at fault and say what to do about it.
"""


class NeoError(Exception):
    """A user-fixable problem; its message names the culprit and the fix."""


def run_command(name: str, work) -> int:
    """Run a command-line tool's work; a NeoError becomes one line on stderr and exit status 2
    (the user's mistake, not a crash), anything else stays a traceback (neo's bug)."""
    import sys

    try:
        work()
    except NeoError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0
