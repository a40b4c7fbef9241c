"""Contrastive prompt templates (METHOD.md §1): ``load_template`` and ``render``.

A template is a YAML file::

    mode: revision          # or: instruction
    better:                 # chat messages building x_better
      - {role: system, content: "..."}
      - {role: user, content: "... {query} ... {draft} ..."}
    worse:                  # chat messages building x_worse
      - ...

Placeholders: ``{query}`` (the prompt as text, :func:`treg.io.chat.messages_to_text`) in both modes,
and ``{draft}`` (the response being scored) in revision mode only. Each side must use every
placeholder of its mode; any other placeholder is an error naming the file and placeholder.
Revision mode only: an optional ``draft: worse`` (or ``better``) key puts ``{draft}`` in that side
only (the other side must not use it); the default is ``draft: both``. ``anchored.yaml`` ships with
``draft: worse`` (docs/annotate.md, "Probe", for why).
Literal braces are written ``{{`` and ``}}`` (Python ``str.format`` rules). The defaults ship in
``treg/method/templates/revision.yaml`` (default), ``instruction.yaml`` and ``anchored.yaml``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from treg.errors import TregError

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN = ("revision", "instruction", "anchored")
PLACEHOLDERS = {"revision": ("query", "draft"), "instruction": ("query",)}
SIDES = ("better", "worse")


@dataclass(frozen=True)
class Template:
    """A validated template. ``better``/``worse``: tuples of ``{role, content}`` dicts with
    placeholders; ``text``: the YAML source (recorded in the output's meta); ``path``: its file."""
    mode: str
    better: tuple
    worse: tuple
    text: str
    path: str


def _placeholders(content: str, *, file: str, field: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(content))
    except ValueError as err:
        raise TregError(f"bad braces ({err}); write literal braces as {{{{ and }}}}",
                        file=file, field=field) from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise TregError(f"unknown placeholder {{{name}{'!' + conversion if conversion else ''}"
                            f"{':' + spec if spec else ''}}}", file=file, field=field)
        names.add(name)
    return names


def parse_template(text: str, path: str = "<template>") -> Template:
    """Parse and validate YAML template text (see module docstring); TregError on any problem."""
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TregError(f"invalid YAML: {str(err).splitlines()[0]}", file=path) from None
    if not isinstance(data, dict):
        raise TregError("a template must be a mapping with 'mode', 'better' and 'worse'", file=path)
    unknown = set(data) - {"mode", "better", "worse", "draft"}
    if unknown:
        raise TregError(f"unknown key(s) {sorted(unknown)}", file=path, field=sorted(unknown)[0])
    mode = data.get("mode", "revision")
    if mode not in PLACEHOLDERS:
        raise TregError(f"mode must be 'revision' or 'instruction', not {mode!r}", file=path, field="mode")
    allowed = PLACEHOLDERS[mode]
    draft = data.get("draft", "both")
    if draft not in ("both", *SIDES) or (mode != "revision" and "draft" in data):
        raise TregError("'draft' is 'both', 'better' or 'worse', in revision mode only", file=path, field="draft")
    sides = {}
    for side in SIDES:
        msgs = data.get(side)
        if not isinstance(msgs, list) or not msgs:
            raise TregError("expected a non-empty list of {role, content} messages", file=path, field=side)
        used = set()
        out = []
        for i, msg in enumerate(msgs):
            where = f"{side}[{i}]"
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                    or not isinstance(msg.get("content"), str):
                raise TregError("each message needs string 'role' and 'content'", file=path, field=where)
            names = _placeholders(msg["content"], file=path, field=f"{where}.content")
            bad = sorted(names - set(allowed))
            if bad:
                raise TregError(f"unknown placeholder {{{bad[0]}}} (allowed in {mode} mode: "
                                f"{', '.join('{' + a + '}' for a in allowed)})", file=path,
                                field=f"{where}.content")
            used |= names
            out.append({"role": msg["role"], "content": msg["content"]})
        if draft not in ("both", side):
            if "draft" in used:
                raise TregError(f"{{draft}} in '{side}' while 'draft: {draft}' puts it in '{draft}' only",
                                file=path, field=side)
            used.add("draft")
        missing = [a for a in allowed if a not in used]
        if missing:
            raise TregError(f"missing placeholder {{{missing[0]}}} ({mode} mode needs "
                            f"{', '.join('{' + a + '}' for a in allowed)} on each side)",
                            file=path, field=side)
        sides[side] = tuple(out)
    return Template(mode=mode, better=sides["better"], worse=sides["worse"], text=text, path=path)


def load_template(spec: str | Path = "revision") -> Template:
    """``"revision"`` / ``"instruction"`` (shipped) or the path of a user YAML file."""
    path = TEMPLATE_DIR / f"{spec}.yaml" if str(spec) in BUILTIN else Path(spec)
    if not path.is_file():
        raise TregError(f"no such template (use {' or '.join(BUILTIN)} or a .yaml file)", file=str(spec))
    from treg.io.fsutil import read_text_strict
    return parse_template(read_text_strict(path, what="template file"), str(spec))


def render(template: Template, *, query: str, draft: str | None = None) -> tuple[list[dict], list[dict]]:
    """The ``(x_better, x_worse)`` message lists for one prompt (and, in revision mode, one draft)."""
    if template.mode == "revision" and draft is None:
        raise ValueError("revision mode needs the draft response")
    values = {"query": query, "draft": draft}
    return tuple([{"role": m["role"], "content": m["content"].format(**values)} for m in msgs]
                 for msgs in (template.better, template.worse))
