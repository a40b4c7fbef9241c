"""The docs tell the truth about the CLI and the repository.

Every ``treg <cmd> ...`` command in README.md and docs/*.md (fenced code blocks and inline code spans,
also under ``accelerate launch ... -m treg <cmd>``) may use only ``--flags`` that the command's parser
accepts (``build_parser()`` of argparse commands, the TRegConfig parser for ``treg train``), and every
repository path the docs name (markdown links, ``configs/...``, ``benchmarks/...``, ``treg/...``,
``tests/x.py::test_name`` and tests cited by name) must exist. Also: ``benchmarks/bench_*.py --flag``
lines use declared flags, train YAML (blocks and heredocs) uses TRegConfig fields only, and pipeline
YAML passes the planner's checks. Pure text + parser construction: no model is loaded (~3 s).
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from treg.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# "treg <cmd>" at a word start or as ".venv/bin/treg <cmd>", or "-m treg <cmd>" / "-m treg.cli <cmd>".
COMMAND = re.compile(r"(?:^|(?<=\s)|(?<=-m\s)|(?<=bin/))treg(?:\.cli)?\s+([a-z]+)\b(.*)")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:configs|benchmarks|treg|tests|docs)/[\w./-]*[\w/])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
BENCH = re.compile(r"(benchmarks/bench_\w+\.py)(.*)")
TEST_REF = re.compile(r"(tests/test_\w+\.py)::(\w+)")
YAML_BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)
HEREDOC = re.compile(r"<<\s*'?(\w+)'?\n(.*?)^\1$", re.S | re.M)
TOP_KEY = re.compile(r"^([A-Za-z_]\w*):", re.M)


def _logical_lines(block: str) -> list[str]:
    """Lines of a code block, with ``\\``-continued and indented continuation lines joined."""
    lines: list[str] = []
    for raw in block.splitlines():
        if lines and (lines[-1].endswith("\\") or (raw[:1].isspace() and raw.strip())):
            lines[-1] = lines[-1].rstrip("\\") + " " + raw.strip()
        else:
            lines.append(raw)
    return lines


def doc_snippets() -> list[tuple[str, str]]:
    """(file, code) for every logical code-block line and inline code span, shell comments dropped."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        snippets = [line for block in FENCE.findall(text) for line in _logical_lines(block)]
        snippets += INLINE.findall(FENCE.sub("", text))
        out += [(doc.name, re.split(r"\s#\s", s, maxsplit=1)[0]) for s in snippets]
    return out


def doc_commands() -> list[tuple[str, str, str]]:
    """(file, command name, argument text) for every ``treg <cmd>`` in the docs' code."""
    return [(doc, m.group(1), m.group(2)) for doc, code in doc_snippets()
            for m in COMMAND.finditer(code) if m.group(1) in COMMANDS]


def accepted_flags(command: str) -> set[str]:
    """Every option string the command's parser accepts (sub-commands' options included)."""
    if command == "train":
        from treg.stages.config import config_parser
        parser = config_parser()
    else:
        module = importlib.import_module(COMMANDS[command][0])
        parser = getattr(module, "build_parser")
        parser = parser()
    flags, todo = set(), [parser]
    if command == "train":  # read by treg.cli.train.main before the config parser
        from treg.cli.train import HELP_FLAGS
        flags.update(HELP_FLAGS)
    while todo:
        p = todo.pop()
        for action in p._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return flags


def test_docs_show_commands():
    """The extractor finds the documented commands at all (an empty scan would pass vacuously)."""
    names = {name for _, name, _ in doc_commands()}
    assert {"sample", "score", "annotate", "train", "generate", "eval", "show", "pipeline", "demo",
            "toy"} <= names


def test_every_documented_flag_is_accepted():
    commands = doc_commands()
    accepted = {name: accepted_flags(name) for name in {n for _, n, _ in commands}}
    wrong = sorted({f"{doc}: treg {name} {flag}" for doc, name, args in commands
                    for flag in FLAG.findall(args) if flag not in accepted[name]})
    assert not wrong, "flags the parsers do not accept:\n" + "\n".join(wrong)


def test_every_documented_benchmark_flag_exists():
    """``benchmarks/bench_*.py --flag`` in the docs: the script declares ``add_argument("--flag"``."""
    wrong, seen = [], 0
    for doc, code in doc_snippets():
        for script, args in BENCH.findall(code):
            source = (ROOT / script).read_text(encoding="utf-8") if (ROOT / script).exists() else ""
            for flag in FLAG.findall(args):
                seen += 1
                if f'"{flag}"' not in source:
                    wrong.append(f"{doc}: {script} {flag}")
    assert seen > 0 and not wrong, "benchmark flags the scripts do not declare:\n" + "\n".join(wrong)


def test_every_documented_train_yaml_key_is_a_config_field():
    """YAML shown for ``treg train`` (yaml blocks and shell heredocs with a ``dataset_path`` or
    ``model_name_or_path`` key) uses only TRegConfig fields (``treg train`` refuses unknown keys)."""
    import dataclasses

    from treg.stages.config import TRegConfig
    fields = {f.name for f in dataclasses.fields(TRegConfig)}
    wrong, seen = [], 0
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        bodies = YAML_BLOCK.findall(text) + [body for _, body in HEREDOC.findall(text)]
        for body in bodies:
            keys = TOP_KEY.findall(body)
            if not {"dataset_path", "model_name_or_path"} & set(keys):
                continue
            seen += 1
            wrong += [f"{doc.name}: {key}" for key in keys if key not in fields]
    assert seen >= 2 and not wrong, "train YAML keys that TRegConfig lacks:\n" + "\n".join(wrong)


def test_every_documented_pipeline_yaml_plans(tmp_path):
    """Pipeline YAML shown in the docs (a ``workdir`` key) loads, plans and passes the planner's option
    check (``$(...)`` shell substitutions stand in as a plain value)."""
    from treg.stages.pipeline import check_options, load_config, plan
    seen = 0
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for body in YAML_BLOCK.findall(text) + [b for _, b in HEREDOC.findall(text)]:
            if "workdir" not in TOP_KEY.findall(body):
                continue
            seen += 1
            path = tmp_path / f"pipeline{seen}.yaml"
            path.write_text(re.sub(r"\$\((?:[^()']|'[^']*')*\)", "SUBST", body), encoding="utf-8")
            check_options(plan(load_config(str(path))), str(path))  # TregError names the bad key
    assert seen >= 1


def test_every_documented_repo_path_exists():
    missing = []
    all_tests = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:|#", target):
                continue  # URL or in-page anchor
            path = (doc.parent / target.split("#")[0]).resolve()
            if path.is_relative_to(ROOT) and not path.exists():
                missing.append(f"{doc.name}: link {target}")
        for span in [*FENCE.findall(text), *INLINE.findall(text)]:
            for rel in REPO_PATH.findall(span):
                is_metric = rel.startswith("treg/") and not rel.endswith("/") and "." not in rel.split("/")[-1]
                if "..." in rel or is_metric:
                    continue  # ".../x" is an elision; `treg/seq_weight` is a logged metric, not a file
                if not (ROOT / rel).exists():
                    missing.append(f"{doc.name}: {rel}")
        for test_file, name in TEST_REF.findall(text):
            source = (ROOT / test_file).read_text(encoding="utf-8") if (ROOT / test_file).exists() else ""
            if f"def {name}(" not in source:
                missing.append(f"{doc.name}: {test_file}::{name}")
        for name in re.findall(r"`(test_\w+)`", text):  # a test cited by name alone
            if f"def {name}(" not in all_tests:
                missing.append(f"{doc.name}: test {name}")
    assert not missing, "docs name repository paths that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("line, name, flags", [
    ("accelerate launch --num_processes 8 -m treg annotate --model M  # c --nope", "annotate", ["--model"]),
    ("treg train --config run.yaml --alpha 0.5", "train", ["--config", "--alpha"]),
])
def test_extractor_reads_command_lines(line, name, flags):
    code = re.split(r"\s#\s", line, maxsplit=1)[0]
    match = COMMAND.search(code)
    assert match and match.group(1) == name and FLAG.findall(match.group(2)) == flags
    assert set(flags) <= accepted_flags(name) and "--nope" not in accepted_flags(name)
