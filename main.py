"""neo's entry point, as GPT-Neo's: `python main.py --model CONFIG [--predict | --eval | ...]`.
The command line itself is neo/cli.py."""

from neo.cli import cli

if __name__ == "__main__":
    cli()
