"""Untrusted tool code in a subprocess: CPU-time, memory and file-size limits (resource.setrlimit), a fresh temp dir
as its working directory and only writable place, no sockets and no child processes (an audit hook the child
installs before running anything), a wall-clock timeout, and its output cut to a set length.

The shipped `calculate(expression)` tool evaluates arithmetic there: an AST walk that allows numbers, + - * / // % **
and parentheses only, so a model cannot reach Python through it; the limits stop 9**9**9 and its kin."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from alignkit.envs.tools import truncate


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 2
    memory_bytes: int = 256 * 2**20
    wall_seconds: float = 5.0
    output_chars: int = 1000
    file_bytes: int = 2**20  # the largest file it may write (inside its temp dir)


# Installed in the child before the tool's code runs; an audit hook cannot be removed once added (PEP 578).
_GUARD = r"""
import os, sys
_root = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _writes(mode, flags):
    return any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
def _guard(event, args):
    if event.startswith(("socket.", "subprocess.", "os.exec", "os.fork", "os.posix_spawn", "os.spawn", "os.system",
                         "pty.", "ctypes.")):
        raise PermissionError(f"{event} is not allowed in the tool sandbox")
    if event == "open" and _writes(args[1], args[2]):
        path = args[0]
        if isinstance(path, int) or not os.path.realpath(os.fsdecode(path)).startswith(_root + os.sep):
            raise PermissionError(f"writing {path!r} is not allowed in the tool sandbox (only its temp dir)")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.symlink", "os.link",
                 "shutil.rmtree", "os.truncate"):
        path = args[0]
        if isinstance(path, int) or not os.path.realpath(os.fsdecode(path)).startswith(_root + os.sep):
            raise PermissionError(f"{event} on {path!r} is not allowed in the tool sandbox")
sys.addaudithook(_guard)
del _guard
"""


def _set_limits(limits: SandboxLimits):
    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_sandboxed(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> str:
    """Run Python `source` in the sandbox and return its stdout (cut to limits.output_chars), or {"error": ...} as
    JSON when it fails, is killed by a limit or outlives limits.wall_seconds."""
    with tempfile.TemporaryDirectory(prefix="alignkit-tool-") as workdir:
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0"}
        try:
            done = subprocess.run([sys.executable, "-I", "-S", "-c", _GUARD + source], input=stdin,
                                  capture_output=True, text=True, cwd=workdir, env=env,
                                  timeout=limits.wall_seconds, preexec_fn=_set_limits(limits))
        except subprocess.TimeoutExpired:
            return json.dumps({"error": f"timed out after {limits.wall_seconds:g} s"})
    if done.returncode != 0:
        return json.dumps({"error": _failure(done, limits)})
    return truncate(done.stdout.strip(), limits.output_chars)


def _failure(done: subprocess.CompletedProcess, limits: SandboxLimits) -> str:
    if done.returncode in (-9, -24):  # SIGKILL / SIGXCPU: the CPU-time limit
        return f"killed: over the CPU-time limit of {limits.cpu_seconds} s"
    last = (done.stderr.strip().splitlines() or [f"exited with status {done.returncode}"])[-1]
    if "MemoryError" in last:
        return f"out of memory (limit {limits.memory_bytes // 2**20} MiB)"
    return truncate(last, 300)


_CALCULATOR = r"""
import ast, json, operator, sys
from fractions import Fraction
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
def ev(node):
    if isinstance(node, ast.Expression):
        return ev(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        left, right = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > 10000:
                raise ValueError("exponents must be whole numbers up to 10000")
            right = int(right)
        return OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        return ev(node.operand) if isinstance(node.op, ast.UAdd) else -ev(node.operand)
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")
try:
    value = ev(ast.parse(sys.stdin.read().replace("^", "**"), mode="eval"))
except ZeroDivisionError:
    print('{"error": "division by zero"}')
except (SyntaxError, ValueError) as err:
    print(json.dumps({"error": str(err)}))
else:
    print(value.numerator if value.denominator == 1 else repr(round(value.numerator / value.denominator, 10)))
"""


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: The expression, e.g. "37 * 24 - 150". Numbers, + - * / // % ** and parentheses only.
    """
    if len(expression) > 500:
        return json.dumps({"error": "the expression is longer than 500 characters"})
    return run_sandboxed(_CALCULATOR, expression)


if os.name != "posix":  # resource limits and preexec_fn are POSIX only
    raise ImportError("alignkit.envs.sandbox needs a POSIX system (resource limits)")
