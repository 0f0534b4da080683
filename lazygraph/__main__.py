"""Command line: read a dump folder written with LAZYGRAPH_DUMP=DIR or lazygraph.dump(dir=DIR).

    python -m lazygraph show DIR                          terminal summary of every graph run
    python -m lazygraph diff DIR place fuse [--run N]     what the passes between two stages changed
    python -m lazygraph html DIR -o report.html           one self-contained HTML report

Errors (a missing folder, a dump without runs, an unknown pass, a report that cannot be written)
are one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .report import diff, html, show

COMMANDS = {"show": (show, "terminal summary of each graph run"),
            "diff": (diff, "unified diff + summary of what one pass changed"),
            "html": (html, "write one self-contained HTML report")}
ERROR_EXIT = 2


def error_message(e: Exception) -> str:
    """One sentence for the user. An OSError raised by the system carries an errno as args[0] (what used
    to be printed alone, "2"): name the file and the reason instead."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror[0].lower()}{e.strerror[1:]}"
    return str(e.args[0]) if e.args else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazygraph", description=__doc__.splitlines()[0],
                                     epilog="Errors exit with status 2 and one line on stderr.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][0].main(args)
    except (LookupError, OSError) as e:  # a wrong name, folder or output path: say so, no traceback
        print(f"lazygraph {args.command}: {error_message(e)}", file=sys.stderr)
        return ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
