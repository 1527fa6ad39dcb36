"""What the host does to a run's source before the guest sees it, for code
written with other tools' habits (E2B's code interpreter, Node). Pure
functions over the source; nothing here decides anything on the host.

The receipt hashes the code exactly as the client sent it (cells.py hashes it
in the web process); these rewrites happen later, in the worker, and only
change code that would otherwise fail at once:

- ``dedent_python``: code whose every line shares a leading indentation (a
  snippet copied out of a function or a notebook) has it removed, as IPython
  does. Such code never compiles as it is ("unexpected indent"), so valid
  code is never changed.
- ``node_imports``: ``import fs from 'fs'`` and its forms, for the few Node
  modules the JavaScript compatibility layer offers (js_node.py), become
  ``var fs = require('fs')``. QuickJS evaluates a cell as a script, where an
  ``import`` statement is a SyntaxError, so again only failing code changes.
- ``env_set`` / ``env_restore``: the turns that give one run its own
  environment variables (E2B's ``run_code(envs=...)``) and put the cell's
  back after it. The values travel as JSON data inside a string literal,
  never as source text.
"""
from __future__ import annotations

import json
import os
import re

_WS = " \t"


def dedent_python(code: bytes) -> bytes:
    """``code`` without the leading whitespace all its non-blank lines share."""
    try:
        text = code.decode("utf-8")
    except UnicodeDecodeError:
        return code
    lines = text.split("\n")
    margins = [line[: len(line) - len(line.lstrip(_WS))] for line in lines if line.strip(_WS + "\r")]
    if not margins or not margins[0]:
        return code
    prefix = os.path.commonprefix(margins)  # C-speed: the source is guest-sized
    if not prefix:
        return code
    out = [line[len(prefix):] if line.startswith(prefix) else line.lstrip(_WS) if not line.strip(_WS + "\r") else line
           for line in lines]
    return "\n".join(out).encode("utf-8")


# Node modules the JavaScript layer offers through require() (js_node.py).
NODE_MODULES = ("fs", "path", "process")
_IDENT = r"[A-Za-z_$][\w$]*"
# T-DOS-1: the source is guest-controlled and this runs on the host, so the
# rewrite is linear in its length. The tail (`from 'fs'`) starts with a literal
# and is found in one pass; each tail's clause is looked for only in the text
# between the previous tail and this one (at most _CLAUSE_MAX characters), so
# no character is scanned twice, and at most _TAILS_MAX tails are looked at.
# (A single pattern with a lazy clause before `from` took 45 s on 112 KB of
# `import a from` lines.)
_TAIL = re.compile(r"from[ \t]+(?P<q>['\"])(?P<mod>(?:node:)?(?:" + "|".join(NODE_MODULES) + r"))(?P=q)[ \t]*;?")
_HEAD = re.compile(r"(?:^|(?<=;))(?P<indent>[ \t]*)import[ \t]+", re.M)
_CLAUSE_MAX = 1024
_TAILS_MAX = 256
_NAMED = re.compile(r"^(" + _IDENT + r")(?:\s+as\s+(" + _IDENT + r"))?$")


def _binding(what: str) -> str | None:
    """The ``var`` pattern for an import clause, or None when it is not one we rewrite."""
    what = what.strip()
    m = re.fullmatch(r"\*\s+as\s+(" + _IDENT + ")", what)
    if m:
        return m.group(1)
    if re.fullmatch(_IDENT, what):
        return what
    m = re.fullmatch(r"\{([^{}]*)\}", what, re.S)
    if m:
        parts = []
        for item in m.group(1).split(","):
            item = item.strip()
            if not item:
                continue
            named = _NAMED.match(item)
            if named is None:
                return None
            parts.append(named.group(1) + (": " + named.group(2) if named.group(2) else ""))
        return "{ " + ", ".join(parts) + " }"
    return None


def node_imports(code: bytes) -> bytes:
    """``import ... from 'fs'`` (and 'path', 'process', 'node:...') as ``var ... = require(...)``.
    Line numbers are kept (the replacement has as many line breaks)."""
    try:
        text = code.decode("utf-8")
    except UnicodeDecodeError:
        return code
    if "import" not in text:
        return code

    out: list[str] = []
    done = 0  # text[:done] is already in out
    floor = 0  # a clause holds no quote, so it never reaches back past an earlier tail
    for count, tail in enumerate(_TAIL.finditer(text)):
        if count == _TAILS_MAX:  # a cell imports a handful of these; the rest is left as it is
            break
        lo = max(floor, tail.start() - _CLAUSE_MAX)
        floor = tail.end()
        window = text[lo:tail.start()]
        heads = list(_HEAD.finditer(window))
        if not heads or (lo > 0 and heads[-1].start() == 0 and text[lo - 1] not in "\n;"):
            continue
        head = heads[-1]
        clause = window[head.end():]
        if not clause[-1:].isspace() or any(ch in clause for ch in "'\";"):
            continue
        stmt = _statement(clause, tail.group("mod"))
        if stmt is None:
            continue
        start = lo + head.start()
        out.append(text[done:start])
        out.append(head.group("indent") + stmt + "\n" * text.count("\n", start, tail.end()))
        done = tail.end()
    out.append(text[done:])
    return "".join(out).encode("utf-8")


def _statement(clause: str, mod: str) -> str | None:
    """``var ... = require(mod);`` for an import clause, or None when it is not one we rewrite."""
    what = clause.strip()
    req = f"require({json.dumps(mod)})"
    default, _, rest = what.partition(",")
    if rest.strip() and re.fullmatch(_IDENT, default.strip()):  # import fs, { readFileSync } from 'fs'
        named = _binding(rest)
        if named is None or not named.startswith("{"):
            return None
        return f"var {default.strip()} = {req}, {named} = {default.strip()};"
    target = _binding(what)
    if target is None:
        return None
    return f"var {target} = {req};"


# -- per-run environment variables ----------------------------------------------

def env_set(language: str, envs: dict[str, str]) -> bytes:
    """Source of the turn that sets ``envs`` for one run and remembers what they replaced."""
    data = json.dumps(envs, ensure_ascii=True)
    if language == "python":
        return ("def _cell_run_env_():\n"
                "    import json, os, sys\n"
                f"    new = json.loads({data!r})\n"
                "    sys._cell_run_env_ = {k: os.environ.get(k) for k in new}\n"
                "    os.environ.update(new)\n"
                "_cell_run_env_()\n"
                "del _cell_run_env_\n").encode("ascii")
    return ("(() => { const n = JSON.parse(" + json.dumps(data) + "), s = {};\n"
            "  for (const k of Object.keys(n)) { s[k] = std.getenv(k); std.setenv(k, n[k]); }\n"
            "  Object.defineProperty(globalThis, '__cellRunEnv', { value: s, configurable: true, writable: true });\n"
            "})();\n").encode("ascii")


def env_restore(language: str) -> bytes:
    """Source of the turn that puts back what ``env_set`` replaced."""
    if language == "python":
        return ("def _cell_run_env_():\n"
                "    import os, sys\n"
                "    saved = sys.__dict__.pop('_cell_run_env_', None) or {}\n"
                "    for k, v in saved.items():\n"
                "        if v is None:\n"
                "            os.environ.pop(k, None)\n"
                "        else:\n"
                "            os.environ[k] = v\n"
                "_cell_run_env_()\n"
                "del _cell_run_env_\n").encode("ascii")
    return ("(() => { const s = globalThis.__cellRunEnv; delete globalThis.__cellRunEnv;\n"
            "  if (s) for (const k of Object.keys(s)) { if (s[k] === undefined) std.unsetenv(k); else std.setenv(k, s[k]); }\n"
            "})();\n").encode("ascii")
