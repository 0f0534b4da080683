"""Command line: read a dump folder written with LAZYGRAPH_DUMP=DIR or lazygraph.dump(dir=DIR).

    python -m lazygraph show DIR                 terminal summary of every graph run
    python -m lazygraph diff DIR 01-simplify 02-place [--run N]   what one pass changed
    python -m lazygraph html DIR -o report.html  one self-contained HTML report
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .report import diff, html, show

COMMANDS = {"show": (show, "terminal summary of each graph run"),
            "diff": (diff, "unified diff + summary of what one pass changed"),
            "html": (html, "write one self-contained HTML report")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazygraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][0].main(args)
    except (LookupError, FileNotFoundError) as e:  # a wrong name or folder: say so, no traceback
        print(f"lazygraph {args.command}: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
