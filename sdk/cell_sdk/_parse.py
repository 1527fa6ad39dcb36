"""Turn a run's answer into E2B's ``Execution`` shape: the error the code
raised (from the traceback the guest printed) and the value of the last
expression (from what the guest's REPL echoed). Pure functions over strings."""
from __future__ import annotations

import ast
import re

from cell_sdk.models import ExecutionError

_PY_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")
_JS_EXC_LINE = re.compile(r"^([A-Za-z_$][\w$]*):\s?(.*)$")
_JS_STACK_LINE = re.compile(r"^\s+at\s")
_TB_HEADER = "Traceback (most recent call last):"

# Run statuses that are not an exception of the code but a limit of the cell.
_LIMIT_ERRORS = {
    "timeout": ("TimeoutError", "the run hit its time limit"),
    "memory_limit": ("MemoryError", "the run hit its memory limit"),
    "output_limit": ("OutputLimitError", "the run's output went over the cap and was truncated"),
    "killed": ("KilledError", "the run was killed"),
}


def split_lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def python_error(stderr: str) -> ExecutionError | None:
    """The last traceback in ``stderr``: name and value from its exception
    line, e.g. ``ZeroDivisionError: division by zero``."""
    start = stderr.rfind(_TB_HEADER)
    block = stderr[start:] if start >= 0 else stderr
    lines = block.rstrip("\n").split("\n")
    # The exception line is the first line after the header without indent
    # (SyntaxError also prints indented source and a caret first).
    order = range(1, len(lines)) if start >= 0 else range(len(lines) - 1, -1, -1)
    for i in order:
        line = lines[i]
        if line and not line[0].isspace():
            m = _PY_EXC_LINE.match(line)
            if m:
                value = "\n".join([m.group(2) or ""] + lines[i + 1:]).rstrip("\n")
                return ExecutionError(name=m.group(1), value=value, traceback=block.rstrip("\n"))
    return None


def js_error(stderr: str) -> ExecutionError | None:
    """The last ``Name: message`` line followed only by stack lines."""
    lines = stderr.rstrip("\n").split("\n")
    end = len(lines)
    while end > 0 and (not lines[end - 1].strip() or _JS_STACK_LINE.match(lines[end - 1])):
        end -= 1
    if end == 0:
        return None
    head = lines[end - 1]
    m = _JS_EXC_LINE.match(head)
    tb = "\n".join(lines[end - 1:])
    if m:
        return ExecutionError(name=m.group(1), value=m.group(2), traceback=tb)
    return ExecutionError(name="Error", value=head, traceback=tb)  # e.g. `throw 5`


def execution_error(template: str, status: str, exit_code: int, stderr: str, note: str | None) -> ExecutionError | None:
    if status == "ok":
        return None
    if status in _LIMIT_ERRORS:
        name, default = _LIMIT_ERRORS[status]
        return ExecutionError(name=name, value=note or default, traceback=stderr.rstrip("\n"))
    parsed = python_error(stderr) if template == "python3" else js_error(stderr) if template == "javascript" else None
    if parsed is not None:
        return parsed
    tail = stderr.rstrip("\n").rsplit("\n", 1)[-1] if stderr.strip() else ""
    return ExecutionError(name="ExitError" if exit_code > 0 else "RuntimeError",
                          value=tail or note or f"exit code {exit_code}", traceback=stderr.rstrip("\n"))


_JS_NO_VALUE = re.compile(r"^(let|const|var|function|class|if|for|while|do|switch|try|return|throw|import|export)\b|^console\.|^[}\]]")


def _python_tail_expression(code: str) -> tuple[bool, bool]:
    """(ends in an expression that the REPL may echo, something before it may print)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False, True
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return False, True
    value = tree.body[-1].value
    if isinstance(value, ast.Constant) and value.value is None:
        return False, True
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("print", "exec", "help"):
        return False, True
    prints = any(
        isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Name) and node.func.id in ("print", "exec", "eval", "display", "help"))
            or (isinstance(node.func, ast.Attribute) and node.func.attr in ("write", "writelines", "print", "show", "info", "display"))
        )
        for node in ast.walk(tree)
    ) or any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for node in tree.body)
    return True, prints


def main_result_text(template: str, code: str, stdout: str, status: str) -> str | None:
    """The value of the code's last expression, as the guest's REPL echoed it.

    The server runs the code unmodified (the receipt hashes it as sent) and
    its REPL prints ``repr`` of a last bare expression to stdout, after any
    output of the code itself, exactly as a Python or QuickJS prompt does. So:

    * Python: ``ast`` says whether the code ends in an expression (not a
      ``print(...)`` and not ``None``). If nothing in the code can print
      (no print/write/display call, no function defined), all of stdout is
      the echo, so multi-line reprs (arrays, DataFrames) come out whole;
      otherwise the last line of stdout is taken.
    * JavaScript: the last statement is judged by its first word (not a
      declaration, loop, ``console.*`` or closing brace); the last line of
      stdout is taken.

    Limit, documented: an expression that itself prints and evaluates to
    None/undefined (``f()`` where ``f`` prints) has its last printed line
    reported as the result.
    """
    if status != "ok" or not stdout.endswith("\n"):
        return None
    if template == "python3":
        ends_in_expr, may_print = _python_tail_expression(code)
        if not ends_in_expr:
            return None
        if not may_print:
            return stdout[:-1]
        return stdout[:-1].rsplit("\n", 1)[-1]
    if template == "javascript":
        statements = [s.strip() for s in re.split(r"[;\n]", _strip_js_comments(code)) if s.strip()]
        if not statements or _JS_NO_VALUE.match(statements[-1]) or "console." in statements[-1]:
            return None
        return stdout[:-1].rsplit("\n", 1)[-1]
    return None


def _strip_js_comments(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.S)
    return re.sub(r"(^|\s)//[^\n]*", r"\1", code)
