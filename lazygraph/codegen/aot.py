"""Ahead-of-time builds for a real GPU without one (default sm_90, an H100): the one builder that
both the generated kernels and the flash-attention kernels go through.

A job names a @triton.jit function (by its file, or by its module), its signature, constexprs
and num_warps (the launch's: it changes the code), and the file its result goes to: {"ptx": text,
"shared": bytes of shared memory a launch needs}. A job whose result file exists is not built
again, so callers key the file on what decides the result (the kernel's text, signature,
constexprs, num_warps, target, Triton's version). An optional "cost" (default 1) orders the
work: the builders take the costliest jobs first and then whichever is left, one at a time, so
one slow kernel does not leave the other cores idle at the end.

The builders are subprocesses with the interpreter off (where TRITON_INTERPRET=1, Triton's own
helpers such as tl.sum are interpreter functions and cannot be compiled), one per core since
ptxas is single-threaded. This file runs as a plain script there: it imports only Triton, not
lazygraph or torch, whose import would cost each builder seconds (so do the files it loads
kernels from).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(jobs: list[dict], arch: int = 90, warp_size: int = 32, workers: int | None = None) -> list[dict]:
    """Build every job whose result file is missing; returns each job's result, in order."""
    todo = list({job["out"]: job for job in jobs if not os.path.exists(job["out"])}.values())
    if todo:
        todo.sort(key=lambda job: -job.get("cost", 1))  # stable: equal costs keep the caller's order
        for job in todo:
            os.makedirs(os.path.dirname(job["out"]), exist_ok=True)
        env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
            p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
        n = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        with tempfile.TemporaryDirectory() as claims:
            cmd = [sys.executable, os.path.abspath(__file__), str(arch), str(warp_size), claims]
            procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env) for _ in range(n)]
            for proc in procs:
                proc.stdin.write(json.dumps(todo))
                proc.stdin.close()
            failures = [proc.stderr.read()[-4000:] for proc in procs if proc.wait() != 0]
        if failures:
            raise RuntimeError(f"building kernels for sm_{arch} failed:\n{failures[0]}")
    results = []
    for job in jobs:
        with open(job["out"]) as f:
            results.append(json.load(f))
    return results


def _function(job: dict):
    if job.get("module"):
        import importlib

        return getattr(importlib.import_module(job["module"]), job["name"])
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"lazygraph_build_{job['name']}", job["file"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, job["name"])


def _claim(claims: str, i: int) -> bool:
    """True for the one builder that takes job i (creating its claim file is atomic)."""
    try:
        os.close(os.open(os.path.join(claims, str(i)), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def _build_jobs(arch: int, warp_size: int, claims: str, jobs: list[dict]) -> None:
    """Builder side: compile each job no other builder has claimed and write its result file
    (atomically: a reader never sees half)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for i, job in enumerate(jobs):
        if not _claim(claims, i):
            continue
        consts = job.get("constexprs", {})
        sig = {**job["signature"], **{k: "constexpr" for k in consts}}
        compiled = triton.compile(ASTSource(fn=_function(job), signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", arch, warp_size),
                                  options={"num_warps": job.get("num_warps", 4)})
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(job["out"]), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"ptx": compiled.asm["ptx"], "shared": compiled.metadata.shared}, f)
        os.replace(tmp, job["out"])


if __name__ == "__main__":
    _build_jobs(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.stdin.read()))
