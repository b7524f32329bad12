"""The docs stay true: every command names a script that exists and flags its parser accepts, and
docs/configuration.md documents exactly the config's fields."""
import ast
import contextlib
import dataclasses
import functools
import io
import re
import runpy
import sys

import pytest

from config import GSASRecExperimentConfig
from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "pre_trained" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_commands(text: str) -> list[str]:
    """Every line of the markdown's code blocks and inline code spans, backslash continuations joined."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def script_uses(text: str) -> list[tuple[str, str | None, list[str]]]:
    """(script, subcommand, flags) of each `python3 SCRIPT ...` or `torchrun ... SCRIPT ...` use."""
    uses = []
    for line in shell_commands(text):
        for match in re.finditer(r"(?:python3|torchrun[^|;#]*?)\s+((?:[\w./-]+/)?\w+\.py)([^|;#]*)", line):
            script, rest = match.group(1), match.group(2).split()
            subcommand = rest[0] if rest and re.fullmatch(r"[a-z][a-z-]*", rest[0]) else None
            uses.append((script, subcommand, [flag.split("=")[0] for flag in rest if flag.startswith("--")]))
    return uses


@functools.cache
def accepted_flags(script: str, subcommand: str | None) -> set[str]:
    """The flags in the script's own --help (of the subcommand, when it has subcommands), run in this process as
    `python3 SCRIPT` runs it (a process of its own spends seconds importing torch)."""
    path = REPO / script
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(output), pytest.raises(SystemExit) as ended:
        patch.setattr(sys, "argv", [str(path), *([subcommand] if subcommand else []), "--help"])
        patch.syspath_prepend(str(path.parent))
        runpy.run_path(str(path), run_name="__main__")
    assert ended.value.code in (0, None), f"{script} {subcommand or ''} --help failed"
    return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", output.getvalue()))


USES = sorted({(doc.relative_to(REPO).as_posix(), script, subcommand, tuple(flags))
               for doc in DOCS for script, subcommand, flags in script_uses(doc.read_text())})


def test_the_docs_name_commands():
    assert {script for _, script, _, _ in USES} >= {"train_gsasrec.py", "evaluate_gsasrec.py",
                                                     "datasets/prepare_dataset.py"}


@pytest.mark.parametrize("doc, script, subcommand, flags", USES, ids=lambda value: str(value))
def test_documented_commands_exist_and_use_real_flags(doc, script, subcommand, flags):
    assert (REPO / script).is_file(), f"{doc} runs {script}, which does not exist"
    stale = set(flags) - accepted_flags(script, subcommand)
    assert not stale, f"{doc}: {script} does not accept {sorted(stale)}"


def test_the_command_parser_finds_stale_flags():
    uses = script_uses("```bash\npython3 train_gsasrec.py --config=c.py \\\n    --no-such-flag\n```\n"
                       "and `python3 evaluate_gsasrec.py PATH --calibration`")
    assert uses == [("train_gsasrec.py", None, ["--config", "--no-such-flag"]),
                    ("evaluate_gsasrec.py", None, ["--calibration"])]
    assert "--no-such-flag" not in accepted_flags("train_gsasrec.py", None)


def test_configuration_doc_covers_every_field():
    text = (REPO / "docs" / "configuration.md").read_text()
    documented = re.findall(r"^\| `(\w+)` \|", text.split("## Fields")[1].split("\n## ")[0], re.M)
    assert len(documented) == len(set(documented))
    assert set(documented) == {field.name for field in dataclasses.fields(GSASRecExperimentConfig)}


def test_configuration_doc_gives_every_fields_valid_values():
    text = (REPO / "docs" / "configuration.md").read_text().split("## Valid values")[1].split("\n## ")[0]
    assert set(re.findall(r"`(\w+)`", text)) >= {field.name for field in dataclasses.fields(GSASRecExperimentConfig)}


def test_the_front_door_and_the_docs_stay_short():
    lengths = {doc.relative_to(REPO).as_posix(): len(doc.read_text().splitlines()) for doc in DOCS}
    assert {name: length for name, length in lengths.items() if length > 200} == {}


def project_imports(module: str) -> set[str]:
    """The repository's top-level modules that a module imports."""
    modules = {path.stem for path in REPO.glob("*.py")}
    tree = ast.parse((REPO / f"{module}.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {name.split(".")[0] for name in names} & modules


def test_the_modules_import_as_the_architecture_doc_says():
    """docs/architecture.md's table names what each module imports of the project: it is so, imports go down the
    table (no circle), and gsasrec.py needs nothing beyond torch and the standard library."""
    rows = re.findall(r"^\| `(\w+)\.py` \| [^|]+ \| ([^|]+) \|$", (REPO / "docs" / "architecture.md").read_text(), re.M)
    above = []
    for module, listed in rows:
        expected = set(above) if listed.strip() == "all of the above" else (
            set() if listed.strip().startswith("none") else {name.strip() for name in listed.split(",")})
        assert project_imports(module) == expected, module
        assert expected <= set(above), f"{module} imports a module below it"
        above.append(module)
    assert {"config", "gsasrec", "dataset_utils", "eval_utils", "fast_training", "utils"} <= set(above)
    tree = ast.parse((REPO / "gsasrec.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                           if isinstance(node, ast.ImportFrom)}
    assert imported <= {"torch", *sys.stdlib_module_names}
