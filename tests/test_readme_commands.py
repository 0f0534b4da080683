"""Every command the README documents exists, and so does every flag it passes: each `python -m MODULE`
(or `lazygraph-bench`) found in the README's code blocks and inline code is run with --help, and each
flag used with it must appear in that help. A renamed module or flag fails here, not for a reader.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"lazygraph-bench": "benchmarks"}  # console script -> the module behind it in a checkout
SUBCOMMANDS = {"lazygraph": ("show", "diff", "html")}
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
                if args and args[0] in SUBCOMMANDS.get(module, ()):
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


def _help(key: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, LAZYGRAPH_BUILD_ALL_SM90="0")
    return subprocess.run([sys.executable, "-m", *key, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_each_documented_command_and_flag_exists():
    commands = documented_commands()
    with ThreadPoolExecutor(4) as pool:  # each --help imports torch: side by side
        helps = dict(zip(commands, pool.map(_help, commands)))
    missing = []
    for key, flags in sorted(commands.items()):
        proc = helps[key]
        name = "python -m " + " ".join(key)
        if proc.returncode != 0:
            missing.append(f"{name} --help exits {proc.returncode}: {proc.stderr.strip()[-300:]}")
            continue
        for flag in sorted(flags):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", proc.stdout):
                missing.append(f"{name}: the README passes {flag}, --help does not list it")
    assert not missing, "\n".join(missing)
