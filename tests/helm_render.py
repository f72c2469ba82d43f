"""A small renderer for the subset of Helm's Go templates that deploy/helm/driftline uses.

No Helm binary can run on the development machines, and no renderer of Go templates is on
the package registries, so tests/unit/test_deploy.py renders the chart with this one and
validates the manifests with kubernetes-validate. It is deliberately strict: a template
outside the subset, or a path that is missing from the values, raises
:class:`TemplateError` instead of rendering an empty string (Helm would print nothing), so
a typo in a template fails the test.

Supported (as in text/template and Helm):

- ``{{ pipeline }}`` with ``{{-`` / ``-}}`` trimming the whitespace before / after;
- ``{{/* comment */}}``;
- ``{{ if pipeline }} ... {{ else }} ... {{ end }}`` (Go truthiness: false, 0, "", empty
  list or map and nil are false);
- ``{{ range pipeline }} ... {{ end }}`` over a list, with ``.`` the element and ``$`` the root;
- operands: ``.``, ``$``, ``.A.b.c``, ``$.A.b``, ``"string"``, integers, ``true``/``false``;
- functions (called with arguments, or with the previous pipeline value as the last
  argument): ``not``, ``quote``, ``default``, ``required``, ``toYaml``, ``nindent``,
  ``indent``, ``b64enc``.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TemplateError", "render", "render_chart"]


class TemplateError(ValueError):
    """A template outside the supported subset, or a value it names that is missing."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)


@dataclass
class _Node:
    kind: str  # text | out | if | range
    arg: str = ""
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _lex(src: str) -> list[tuple[str, str]]:
    """(kind, text) tokens: ("text", ...) and ("action", ...), trimming applied."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        tokens.append(("text", text))
        tokens.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = src[pos:]
    tokens.append(("text", tail.lstrip() if trim_next else tail))
    return tokens


def _parse(tokens: list[tuple[str, str]]) -> list[_Node]:
    root: list[_Node] = []
    stack: list[tuple[_Node, bool]] = []  # (block, in_else)

    def sink() -> list[_Node]:
        if not stack:
            return root
        node, in_else = stack[-1]
        return node.orelse if in_else else node.body

    for kind, text in tokens:
        if kind == "text":
            if text:
                sink().append(_Node("text", text))
            continue
        if text.startswith("/*"):
            if not text.endswith("*/"):
                raise TemplateError(f"unterminated comment: {text[:30]!r}")
            continue
        word, _, rest = text.partition(" ")
        if word in ("if", "range"):
            node = _Node(word, rest.strip())
            sink().append(node)
            stack.append((node, False))
        elif word == "else":
            if rest.strip():
                raise TemplateError(f"unsupported: {{{{ {text} }}}} (else if / else with)")
            if not stack or stack[-1][1]:
                raise TemplateError("else without if/range")
            stack[-1] = (stack[-1][0], True)
        elif word == "end":
            if not stack:
                raise TemplateError("end without if/range")
            stack.pop()
        elif word in ("with", "define", "template", "block", "include") or ":=" in text:
            raise TemplateError(f"unsupported action: {{{{ {text} }}}}")
        else:
            sink().append(_Node("out", text))
    if stack:
        raise TemplateError(f"{stack[-1][0].kind} without end")
    return root


def _truthy(v: Any) -> bool:
    return v is not None and v is not False and v != 0 and v != "" and not (
        isinstance(v, (list, tuple, dict)) and not v)


def _to_yaml(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).removesuffix("\n").removesuffix(
        "\n...") if v is not None else "null"


def _indent(n: Any, s: Any) -> str:
    pad = " " * int(n)
    return "\n".join(pad + line for line in _str(s).split("\n"))


def _required(msg: str, v: Any) -> Any:
    if not _truthy(v):
        raise TemplateError(f"required: {msg}")
    return v


def _str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


_FUNCS: Mapping[str, Callable[..., Any]] = {
    "not": lambda v: not _truthy(v),
    "quote": lambda v: json.dumps(_str(v)),
    "default": lambda d, v=None: v if _truthy(v) else d,
    "required": _required,
    "toYaml": _to_yaml,
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "indent": _indent,
    "b64enc": lambda v: base64.b64encode(_str(v).encode()).decode(),
}


def _operand(word: str, dot: Any, root: Any) -> Any:
    if word.startswith('"'):
        return json.loads(word)
    if word in ("true", "false"):
        return word == "true"
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    if word == ".":
        return dot
    if word == "$":
        return root
    if word.startswith("$."):
        base, path = root, word[2:]
    elif word.startswith("."):
        base, path = dot, word[1:]
    else:
        raise TemplateError(f"unsupported operand or function: {word!r}")
    for part in path.split("."):
        if not isinstance(base, Mapping) or part not in base:
            raise TemplateError(f"{word}: no value at {part!r}")
        base = base[part]
    return base


def _eval(pipeline: str, dot: Any, root: Any) -> Any:
    value: Any = None
    first = True
    for command in _split_pipes(pipeline):
        words = shlex.split(command, posix=False)
        if not words:
            raise TemplateError(f"empty command in {pipeline!r}")
        name, args = words[0], [_operand(w, dot, root) for w in words[1:]]
        if name in _FUNCS:
            if not first:
                args.append(value)
            try:
                value = _FUNCS[name](*args)
            except TypeError as exc:
                raise TemplateError(f"{name}: {exc}") from None
        elif first and not args:
            value = _operand(name, dot, root)
        else:
            raise TemplateError(f"unsupported command {command!r}")
        first = False
    return value


def _split_pipes(pipeline: str) -> list[str]:
    parts, buf, quoted = [], "", False
    for ch in pipeline:
        if ch == '"':
            quoted = not quoted
        if ch == "|" and not quoted:
            parts.append(buf.strip())
            buf = ""
        else:
            buf += ch
    parts.append(buf.strip())
    return parts


def _run(nodes: list[_Node], dot: Any, root: Any, out: list[str]) -> None:
    for n in nodes:
        if n.kind == "text":
            out.append(n.arg)
        elif n.kind == "out":
            out.append(_str(_eval(n.arg, dot, root)))
        elif n.kind == "if":
            _run(n.body if _truthy(_eval(n.arg, dot, root)) else n.orelse, dot, root, out)
        else:  # range
            items = _eval(n.arg, dot, root)
            if items is None:
                items = []
            if not isinstance(items, (list, tuple)):
                raise TemplateError(f"range over {type(items).__name__}: lists only")
            if not items:
                _run(n.orelse, dot, root, out)
            for item in items:
                _run(n.body, item, root, out)


def render(src: str, context: Mapping[str, Any]) -> str:
    """Render one template with ``context`` (``{"Values": ..., "Release": ..., "Chart": ...}``)."""
    out: list[str] = []
    _run(_parse(_lex(src)), context, context, out)
    return "".join(out)


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in over.items()}}
    return over


def render_chart(chart: Path, values: Mapping[str, Any] | None = None, *, release: str = "driftline",
                 namespace: str = "driftline") -> dict[str, list[dict[str, Any]]]:
    """Render every ``templates/*.yaml`` of ``chart`` (``values`` merged over values.yaml,
    like ``helm template --set``): template file name -> its non-empty YAML documents."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    merged = _merge(yaml.safe_load((chart / "values.yaml").read_text()), dict(values or {}))
    context = {
        "Values": merged,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion", "")},
    }
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((chart / "templates").glob("*.yaml")):
        text = render(path.read_text(), context)
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise TemplateError(f"{path.name} renders invalid YAML: {exc}\n{text}") from None
        out[path.name] = docs
    return out
