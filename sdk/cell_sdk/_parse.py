"""Turn a run's answer into E2B's ``Execution`` shape: the error the code
raised (from the traceback the guest printed) and, for JavaScript only, the
value of the last statement (from what its REPL echoed; Python runs carry
their results in the answer). Pure functions over strings."""
from __future__ import annotations

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


def main_js_result_text(code: str, stdout: str, status: str) -> str | None:
    """The value of a JavaScript run's last statement, as its REPL echoed it.

    Python runs get their results from the server (MIME bundles, the main one
    from the interpreter's display hook); a JavaScript run has one only when its
    value is a plain object or array, and otherwise its boot loop prints a last value that is not ``undefined`` after the code's
    own output. The last statement is judged by its first word (not a
    declaration, loop, ``console.*`` or closing brace) and the last line of
    stdout is taken. Limit, documented: an expression that itself logs and
    evaluates to undefined has its last logged line reported as the result.
    """
    if status != "ok" or not stdout.endswith("\n"):
        return None
    statements = [s.strip() for s in re.split(r"[;\n]", _strip_js_comments(code)) if s.strip()]
    if not statements or _JS_NO_VALUE.match(statements[-1]) or "console." in statements[-1]:
        return None
    return stdout[:-1].rsplit("\n", 1)[-1]


def _strip_js_comments(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.S)
    return re.sub(r"(^|\s)//[^\n]*", r"\1", code)
