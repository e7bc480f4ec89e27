"""The site's generated reference pages (``docs/_hooks/reference.py``) against the code they describe: every
key of the typed config and every command of the parser, with its options, is listed. (``make test`` also
builds the whole site with ``mkdocs build --strict``.)"""

from __future__ import annotations

import importlib.util
import re

import pytest

from mpe.cli import build_parser, main
from mpe.config import Params
from tests.import_graph import ROOT


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "_hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every key of a params mapping, sections and leaves, dotted (an independent walk of the dump)."""
    out = []
    for k, v in tree.items():
        out.append(prefix + k)
        if isinstance(v, dict) and v:
            out += _dotted_keys(v, prefix + k + ".")
    return out


def test_the_params_reference_lists_every_key_of_the_config(reference):
    text = reference.params_reference()
    keys = _dotted_keys(Params().model_dump(mode="json", by_alias=True))
    assert len(keys) > 100
    leaves = [k for k in keys if f"`{k}`" not in text and not isinstance(_get(k), dict)]
    assert leaves == [], f"keys missing from the params reference: {leaves}"
    sections = [k for k, v in ((k, _get(k)) for k in keys) if isinstance(v, dict) and v and f"## `{k}`" not in text]
    assert sections == [], f"sections without a heading: {sections}"
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in text.splitlines() if line.startswith("| `")]
    undocumented = [cells[0].strip() for cells in rows if not cells[-1].strip()]
    assert undocumented == [], f"keys without a description in the typed config: {undocumented}"
    # a row shows the type, the default and the allowed values of its key
    row = next(line for line in text.splitlines() if line.startswith("| `model.text.pooling`"))
    assert "`multi_prompt`" in row and "`vanilla_clip`" in row and "`defo`" in row
    row = next(line for line in text.splitlines() if line.startswith("| `train.lr`"))
    assert "float" in row and "> 0" in row and "(params.yaml: `0.001`)" in row
    row = next(line for line in text.splitlines() if line.startswith("| `search.index_key`"))
    assert "autofaiss" in row
    for kind in ("karpathy", "clip_benchmark_wds", "image_folder", "negbench_mcq"):
        assert f"### kind `{kind}`" in text


def _get(dotted: str):
    node = Params().model_dump(mode="json", by_alias=True)
    for part in dotted.split("."):
        node = node[part]
    return node


def test_the_cli_reference_lists_every_command_and_its_options(reference, capsys):
    text = reference.cli_reference()
    commands = reference.cli_commands()
    for expected in ("mpe train", "mpe run", "mpe serve", "mpe index", "mpe params show", "mpe experiments run"):
        assert expected in commands
    for command in commands:
        assert f"## `{command}`" in text
        with pytest.raises(SystemExit) as done:  # each is a real command of the parser
            main([*command.split()[1:], "--help"])
        assert done.value.code == 0
        usage = capsys.readouterr().out
        section = text.split(f"## `{command}`", 1)[1].split("\n## ", 1)[0]
        own = set(re.findall(r"(--[a-z][a-z-]+)", usage)) - {"--help", "--params", "--set", "--tracking-uri", "--debug"}
        missing = [opt for opt in own if opt not in section]
        assert missing == [], f"{command}: options missing from the reference: {missing}"
        rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in section.splitlines() if line.startswith("| `")]
        assert all(cells[1].strip() for cells in rows), f"{command}: an option without help: {section}"
    # the options every command shares are listed once
    assert "`--set KEY.PATH=VALUE`" in text and "`--params FILE`" in text and "`--tracking-uri URI`" in text


def test_every_command_of_the_parser_is_in_the_reference(reference):
    """An independent walk: the names ``mpe --help`` and each group's ``--help`` print."""
    parser = build_parser()
    top = re.findall(r"^    ([a-z][a-z-]+)\s", parser.format_help(), re.M)
    assert {"train", "serve", "index", "params", "experiments"} <= set(top)
    commands = reference.cli_commands()
    assert {f"mpe {name}" for name in top} <= set(commands)
