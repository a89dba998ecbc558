"""generate_readme_stub.py as a user runs it: a real process in a copy of the project, offline."""

import os
import platform
import re
import subprocess
import sys

import pytest

import generate_readme_stub
import main
import utils
from boilerplate import options
from conftest import copy_project

pytestmark = pytest.mark.every_python  # fast and pure: the subset .ci/run runs on each other Python

# Any connection through these fails at once: the generator must not need the network.
NO_NETWORK = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
# A flag of the tests' own, named so that no fork's flag takes its name.
NEW_FLAG = (
    '    hyper.add_argument("--test_only_share", type=Number(float, min=0, max=1), default=0.1,\n'
    '                       help="a share the tests add")\n'
)


ANCHOR = "\n\ndef get_parser("  # the end of main.py's add_hyperparameters: a new flag goes before it


@pytest.fixture
def project(tmp_path):
    """A fork of the boilerplate whose parser has one more hyper-parameter than ours."""
    copy_project(tmp_path)
    source = (tmp_path / "main.py").read_text()
    assert source.count(ANCHOR) == 1
    (tmp_path / "main.py").write_text(source.replace(ANCHOR, NEW_FLAG + ANCHOR))
    return tmp_path


def generate(folder, *args, python=(sys.executable,)):
    return subprocess.run(
        [*python, "generate_readme_stub.py", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **NO_NETWORK},
    )


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def usage_rows(readme: str) -> dict[str, tuple[str, list[str]]]:
    """Flag -> (argument group, row cells) for every row of the Usage section's tables."""
    usage = readme.split("\n## Usage\n")[1].split("\n## ")[0]
    rows, group = {}, None
    for line in usage.splitlines():
        if line.startswith("### "):
            group = line[4:]
        elif line.startswith("| `--"):
            row = cells(line)
            assert row[0] not in rows, f"{row[0]} has two rows"
            rows[row[0].strip("`")] = (group, row)
    return rows


def test_usage_has_one_row_per_option_with_type_and_default_even_for_a_new_flag(project):
    done = generate(project)
    assert done.returncode == 0, done.stderr
    rows = usage_rows((project / "README.md").read_text())
    ours = [a.option_strings[0] for g in options.option_groups(main.get_parser()).values() for a in g.actions]
    assert sorted(rows) == sorted(ours + ["--test_only_share"])
    # The new flag's row, rendered from its validator (the demo's own rows: test_demo.py).
    assert (rows["--test_only_share"][0], *rows["--test_only_share"][1][1:3]) == (
        "hyper-parameters",
        "float >= 0 and <= 1",
        "`0.1`",
    )
    assert rows["--test_only_share"][1][3] == "a share the tests add"
    assert not any("(default" in row[3] for _, row in rows.values())


def test_tables_are_the_codes_and_well_formed(project):
    assert generate(project).returncode == 0
    readme = (project / "README.md").read_text()
    tables = generate_readme_stub.tags_table(), generate_readme_stub.metrics_table()
    assert all(t in readme for t in tables) and generate_readme_stub.thresholds_table(main.get_parser()) in readme
    results = readme.split("## Results")[1].split("## License")[0]  # the report's commands, for the person's table
    assert "python report.py OUTPUT_PATH --format markdown" in results and "--wandb ENTITY/PROJECT" in results
    tables, block = [], []
    for line in readme.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            tables.append(block)
            block = []
    assert len(tables) == 7  # four option groups, metrics, tags, thresholds
    for table in tables:
        assert re.fullmatch(r"\|(---\|)+", table[1]), table[1]
        assert len({len(cells(line)) for line in table}) == 1, table


def test_names_the_licence_or_asks_for_one(project):
    assert generate(project).returncode == 0
    section = (project / "README.md").read_text().split("\n## License\n")[1]
    assert section.strip().startswith("MIT License: see [LICENSE](LICENSE).")
    (project / "LICENSE").unlink()
    assert generate(project, "--force").returncode == 0
    section = (project / "README.md").read_text().split("\n## License\n")[1]
    assert "TODO" in section and "choose a licence" in section


def test_refuses_to_overwrite_unless_forced_and_writes_elsewhere(project):
    (project / "README.md").write_text("my own words\n")
    done = generate(project)
    assert done.returncode == 1 and "README.md exists" in done.stderr and "--force" in done.stderr
    assert "Traceback" not in done.stderr and (project / "README.md").read_text() == "my own words\n"

    elsewhere = generate(project, "--output", "docs/README.md")
    assert elsewhere.returncode == 0 and (project / "docs" / "README.md").read_text().startswith("# TODO")
    assert (project / "README.md").read_text() == "my own words\n"

    forced = generate(project, "--force")
    assert forced.returncode == 0 and (project / "README.md").read_text().startswith("# TODO")


def test_without_the_packages_installed_it_names_them_and_says_so(project):
    # -S leaves site-packages out: the generator needs only the standard library, and each import
    # it cannot map to an installed package is listed as it is imported, with a note. A fork's import
    # beside torch's (numpy, say) is not run to read the parser either.
    script = project / "main.py"
    script.write_text(script.read_text().replace("\nimport torch\n", "\nimport numpy as np\nimport torch\n", 1))
    done = generate(project, python=(sys.executable, "-S"))
    assert done.returncode == 0, done.stderr
    section = (project / "README.md").read_text().split("## Requirements")[1].split("## Usage")[0]
    assert "torch  # imported as `torch`, not installed here" in section and "==" not in section
    assert f"on Python {platform.python_version()})" in section  # which Python the versions were seen with


def test_a_file_that_is_not_python_is_named_and_the_rest_still_found(project):
    (project / "scratch.py").write_text("def broken(:\n")
    for venv in (".venv", "env"):  # a virtual environment by any name is not the project's code
        (project / venv).mkdir()
        (project / venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
        (project / venv / "site.py").write_text("import not_a_requirement\n")
    done = generate(project)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "Warning: not read as Python" in done.stderr and "scratch.py (SyntaxError" in done.stderr
    readme = (project / "README.md").read_text()
    assert "torch==" in readme and "not_a_requirement" not in readme


def test_tables_rewrites_the_generated_tables_alone_and_refuses_a_file_without_them(project):
    """After a change to the code (here a new flag, and a tag's meaning), `--tables` brings a README's tables
    up to date in place: what a person wrote there stays as it was."""
    readme = project / "README.md"
    assert generate(project).returncode == 0
    written = readme.read_text().replace("**TODO**: figures, tables, links", "Our results: see the W&B project.")
    assert "Our results" in written
    readme.write_text(written)
    flag = '    hyper.add_argument("--test_only_count", type=Number(int, min=0), default=0, help="a count")\n'
    (project / "main.py").write_text((project / "main.py").read_text().replace(ANCHOR, flag + ANCHOR))
    source = (project / "utils.py").read_text()
    meaning = next(tag.meaning for tag in utils.TAGS if tag.template == "Success")
    (project / "utils.py").write_text(source.replace(f'"{meaning}"', '"it ended well"'))
    done = generate(project, "--tables")
    assert done.returncode == 0 and "4 tables, rewritten" in done.stdout, done.stderr
    text = readme.read_text()
    assert "a count" in usage_rows(text)["--test_only_count"][1][3] and "| it ended well |" in text
    assert text.split("## Results")[1] == written.split("## Results")[1]  # the person's words, kept
    assert generate(project, "--tables").stdout.endswith("4 tables, already current\n")

    (project / "NOTES.md").write_text("# notes\n")
    done = generate(project, "--tables", "NOTES.md", "missing.md")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "NOTES.md: no generated table is marked in it" in done.stderr and "cannot read missing.md" in done.stderr
