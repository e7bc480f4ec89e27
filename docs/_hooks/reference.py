"""The site's reference pages, generated when the site is built, so they cannot drift from the code: every
params key from the typed config (``mpe.config.Params``: type, default, allowed values, doc) and every
``mpe`` command from the CLI's own parser (``mpe.cli.build_parser``).

An mkdocs hook (``hooks:`` in mkdocs.yml): a page holding ``<!-- mpe:params-reference -->`` or
``<!-- mpe:cli-reference -->`` gets the generated text in its place. ``tests/unit/test_docs.py`` loads this
file by path.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[2]
PARAMS_MARK = "<!-- mpe:params-reference -->"
CLI_MARK = "<!-- mpe:cli-reference -->"


# -- params ---------------------------------------------------------------------------------------------
def _params_yaml_values(path: Path = ROOT / "params.yaml") -> dict[str, object]:
    import yaml

    out: dict[str, object] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(yaml.safe_load(path.read_text(encoding="utf-8")), "")
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return "str" if all(isinstance(a, str) for a in args) else " | ".join(type(a).__name__ for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _allowed(tp, metadata) -> str:
    """The values a key accepts: a Literal's choices, numeric bounds, length bounds."""
    parts = []
    for t in [tp, *typing.get_args(tp)]:
        if typing.get_origin(t) is typing.Literal:
            parts.append(", ".join(f"`{a}`" for a in typing.get_args(t)))
        if typing.get_origin(t) in (list, tuple):
            inner = typing.get_args(t)
            if inner and typing.get_origin(inner[0]) is typing.Literal:
                parts.append("each of " + ", ".join(f"`{a}`" for a in typing.get_args(inner[0])))
    for m in metadata:
        for kind, attr, sign in ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<")):
            if isinstance(m, kind):
                parts.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, MinLen):
            parts.append(f"at least {m.min_length} item(s)")
        if isinstance(m, MaxLen):
            parts.append(f"at most {m.max_length} item(s)")
    if any(t is type(None) for t in typing.get_args(tp)):
        parts.append("`null`")
    return "; ".join(parts)


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if isinstance(value, BaseModel):
        return ""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value != value.strip() or not value else f"`{value}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _section_class(tp):
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    return None


def params_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted key, pydantic FieldInfo)`` of every key the typed config accepts, sections included, in
    declaration order (a section's alias, e.g. ``register``, as params.yaml spells it)."""
    from mpe.config import Params

    model = model or Params
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        out.append((key, field))
        section = _section_class(field.annotation)
        if section is not None:
            out.extend(params_keys(section, key + "."))
    return out


def _benchmark_kinds() -> list[type[BaseModel]]:
    from mpe.config import Benchmark

    return list(typing.get_args(typing.get_args(Benchmark)[0]))


def params_reference() -> str:
    """Markdown: one table per section of params.yaml, one row per key."""
    from mpe.config import Params

    shipped = _params_yaml_values()
    lines = [
        "Generated from `mpe.config.Params` when the site is built. *Default* is what applies when the key is "
        "absent; where the project's `params.yaml` sets another value, it is shown beside it. Unknown keys and "
        "values outside *allowed* fail on load with the key named.",
        "",
    ]
    sections: dict[str, list[tuple[str, object]]] = {"(top level)": []}
    for key, field in params_keys():
        if _section_class(field.annotation) is not None:
            sections.setdefault(key, [])
            continue
        parent = key.rpartition(".")[0] or "(top level)"
        sections.setdefault(parent, []).append((key, field))
    classes = {"(top level)": Params}
    for key, field in params_keys():
        if (cls := _section_class(field.annotation)) is not None:
            classes[key] = cls
    for section, rows in sections.items():
        if not rows:
            continue
        lines.append(f"## `{section}`" if section != "(top level)" else "## Top level")
        lines.append("")
        doc = (classes[section].__doc__ or "").strip().split("\n\n")[0]
        if doc and section != "(top level)":
            lines += [" ".join(doc.split()), ""]
        lines += ["| key | type | default | allowed | doc |", "|---|---|---|---|---|"]
        for key, field in rows:
            default = _default(field)
            if key in shipped and repr(shipped[key]) != repr(field.default) and default != "required":
                default += f" (params.yaml: `{shipped[key]}`)"
            doc = field.description or ""
            lines.append(
                f"| `{key}` | {_cell(_type_name(field.annotation))} | {_cell(default)} | "
                f"{_cell(_allowed(field.annotation, field.metadata))} | {_cell(doc)} |"
            )
        lines.append("")
    lines += ["## `evaluate.benchmarks` entries", "", "Each entry is one of these kinds, chosen by `kind`.", ""]
    for cls in _benchmark_kinds():
        kind = typing.get_args(cls.model_fields["kind"].annotation)[0]
        lines += [f"### kind `{kind}`", "", " ".join((cls.__doc__ or "").split()), ""]
        lines += ["| key | type | default | allowed | doc |", "|---|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            lines.append(
                f"| `{name}` | {_cell(_type_name(field.annotation))} | {_cell(_default(field))} | "
                f"{_cell(_allowed(field.annotation, field.metadata))} | "
                f"{_cell(field.description or ('selects this kind' if name == 'kind' else ''))} |"
            )
        lines.append("")
    return "\n".join(lines)


# -- the command line -----------------------------------------------------------------------------------
def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser, str]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((f"{prefix} {name}", sub, helps.get(name) or ""))
                out.extend(_commands(sub, f"{prefix} {name}"))
    return out


def cli_commands() -> list[str]:
    """Every command the parser knows, as typed: ``mpe train``, ``mpe experiments run`` …"""
    from mpe.cli import build_parser

    return [name for name, _, _ in _commands(build_parser(), "mpe")]


def _option_rows(parser: argparse.ArgumentParser, own_only: bool) -> list[str]:
    """One table row per option; ``own_only`` leaves out the options every command shares (``mpe.cli``
    gives them a ``*_sub`` destination after a command's name)."""
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
            continue
        if own_only and a.dest.endswith("_sub"):
            continue
        name = ", ".join(a.option_strings) if a.option_strings else a.dest
        choices = ", ".join(map(str, a.choices)) if a.choices else ""
        if a.choices and not a.option_strings:
            name = f"{a.dest} ({choices})"
        elif a.choices:
            name += f" {{{choices}}}"
        elif a.option_strings and a.nargs != 0:
            name += f" {a.metavar or a.dest.upper()}"
        default = "" if a.default in (None, argparse.SUPPRESS, False, []) else f"`{a.default}`"
        rows.append(f"| `{name}` | {_cell(a.help or '')} | {default} |")
    return rows


def cli_reference() -> str:
    """Markdown: the options every command shares, then each command with its own options."""
    from mpe.cli import build_parser

    parser = build_parser()
    lines = [
        "Generated from `mpe.cli.build_parser()` when the site is built.",
        "",
        "## Options of every command",
        "",
        "They go before or after the command's name: `mpe --params p.yaml train` and "
        "`mpe train --params p.yaml` are the same.",
        "",
        "| option | what | default |",
        "|---|---|---|",
        *[r for r in _option_rows(parser, False) if "--version" not in r],
        "",
        "`mpe --version` prints the version.",
        "",
    ]
    for name, sub, help_text in _commands(parser, "mpe"):
        lines += [f"## `{name}`", "", _cell(help_text or sub.description or ""), ""]
        rows = _option_rows(sub, True)
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            lines += ["Sub-commands below.", ""]
            continue
        if rows:
            lines += ["| option | what | default |", "|---|---|---|", *rows, ""]
        else:
            lines += ["No options of its own.", ""]
    return "\n".join(lines)


# -- the mkdocs hook ------------------------------------------------------------------------------------
def on_page_markdown(markdown: str, page, config, files) -> str:
    if PARAMS_MARK in markdown:
        markdown = markdown.replace(PARAMS_MARK, params_reference())
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_reference())
    return markdown
