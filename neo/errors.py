"""The one exception type for mistakes a user can fix (config, data, flags, checkpoints).

The command line (neo/cli.py) prints these as a message, never as a traceback: the message must
name the field or file at fault and say what to do about it.
"""


class NeoError(Exception):
    """A user-fixable problem; its message names the culprit and the fix."""


def close_matches(word: str, options, n: int = 1) -> list[str]:
    """The `n` known names nearest to a mistyped `word` (difflib's ratio >= 0.6), best first."""
    import difflib

    return difflib.get_close_matches(word, list(options), n=n, cutoff=0.6)


def did_you_mean(word: str, options) -> str:
    """" Did you mean 'x'?" for the known name nearest to `word`, or "" when none is near:
    the tail of an error message about an unknown key, name or value."""
    match = close_matches(word, options)
    return f" Did you mean '{match[0]}'?" if match else ""


def read_user_text(path: str, what: str) -> str:
    """A user's UTF-8 text file (a prompt, a corpus); a missing or non-UTF-8 file is a NeoError
    that starts with `what` and says how to fix it."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NeoError(f"{what}: no such file.") from None
    except UnicodeDecodeError as e:
        raise NeoError(f"{what}: not UTF-8 (byte {e.start}); re-encode it as UTF-8.") from None


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
