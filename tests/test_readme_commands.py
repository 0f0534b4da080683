"""Every command the README documents exists, and so does every flag it passes: each `python -m MODULE`
(or `lazygraph-bench`) found in the README's code blocks and inline code is run with --help, and each
flag used with it must appear in that help. A renamed module or flag fails here, not for a reader.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"lazygraph-bench": "benchmarks"}  # console script -> the module behind it in a checkout
SUBCOMMANDS = {"lazygraph"}  # its first word is a subcommand with flags of its own
EXTERNAL = {"pytest"}  # not this project's: its flags are pytest's
_COMMAND = re.compile(r"(?:\bpython3? -m ([\w.]+)|\b(lazygraph-bench))((?: +[^\s`|&;#]+)*)")


def readme_code() -> list[str]:
    """The text of every fenced block and every inline code span of the README, in order."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return [block or span
            for block, span in re.findall(r"^```[^\n]*\n(.*?)^```|`([^`\n]+)`", text, re.S | re.M)]


def _flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if re.fullmatch(r"(-[A-Za-z]|--[A-Za-z][\w-]*)(=.*)?", a)}


def documented_commands() -> dict[tuple[str, ...], set[str]]:
    """(module, subcommand?) -> the flags the README passes to it. A code span that is only flags
    ("flags: `--sizes`, `--dtypes fp32,bf16`") belongs to the command named last before it."""
    out: dict[tuple[str, ...], set[str]] = {}
    last: tuple[str, ...] | None = None
    for code in readme_code():
        if code.startswith("-") and last is not None:
            out[last].update(_flags(shlex.split(code)))
            continue
        for line in code.splitlines():
            for module, script, rest in _COMMAND.findall(line):
                module = module or SCRIPTS[script]
                args = shlex.split(rest.replace("...", ""))
                key: tuple[str, ...] = (module,)
                if module in SUBCOMMANDS and args and not args[0].startswith("-"):
                    key, args = (module, args[0]), args[1:]
                out.setdefault(key, set()).update(_flags(args))
                last = key
    return out


def test_the_readme_is_parsed():
    commands = documented_commands()
    # the ones every reader meets: the demo, the dump viewer, the benchmarks, the OpInfo sweep
    assert {("gpt2.demo",), ("lazygraph", "html"), ("lazygraph", "show"), ("benchmarks",), ("tests.opinfo",)} \
        <= set(commands), sorted(commands)
    assert {"--quick", "--workloads"} <= commands[("benchmarks",)] and "-o" in commands[("lazygraph", "html")]


def _help(key: tuple[str, ...]) -> tuple[int, str]:
    """(exit status, output) of `python -m MODULE [SUB] --help`, run in this process: torch is imported
    once, not once per command (each would take half a minute on a busy 2-core machine)."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = [key[0], *key[1:], "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": imported by other tests
            runpy.run_module(key[0], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - an import error is the answer: the command does not exist
        code, _ = 1, out.write(f"{type(e).__name__}: {e}")
    finally:
        sys.argv = argv
    return code, out.getvalue()


def test_each_documented_command_and_flag_exists():
    missing = []
    for key, flags in sorted(documented_commands().items()):
        name = "python -m " + " ".join(key)
        if key[0] in EXTERNAL:
            continue
        code, text = _help(key)
        if code != 0:
            missing.append(f"{name} --help exits {code}: {text.strip()[-300:]}")
            continue
        for flag in sorted(flags):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                missing.append(f"{name}: the README passes {flag}, --help does not list it")
    assert not missing, "\n".join(missing)
