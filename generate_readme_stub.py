"""Write a README.md stub for a project started from this boilerplate, generated from its code.

    rm README.md && python generate_readme_stub.py  # then fill in what is marked TODO
    python generate_readme_stub.py --output docs/README.md
    python generate_readme_stub.py --force          # overwrite an existing file
    python generate_readme_stub.py --tables         # only rewrite the generated tables, in place, of
                                                    # README.md and docs/*.md, where they are marked

The Requirements section lists what the project's code imports (found offline by the standard
library, with the versions installed here); the Usage tables come from main.get_parser(), one row per
option; the tags and thresholds tables from utils.TAGS, the table main.py tags runs with.
The generated tables are marked (HTML comments), so that --tables rewrites them alone after the code
changes (a flag, a tag, a metric), in this README or your own.
Exit status: 0 written, 1 not written (the file exists; with --tables, a file without marked tables), 2
bad command line.
"""

import argparse
import ast
import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path

import utils
from boilerplate import options
from boilerplate.files import atomic_write

HERE = Path(__file__).resolve().parent
# Not part of the project's code: tests and benchmarks have their own tools, the rest is output.
NOT_SCANNED = ["tests", "benchmarks", "wandb", "outputs", "data"]
TODO = "**TODO**"  # visible in the rendered page, and easy to grep for


# ----------------------------------------------------------------------------------------------
# Requirements


def imports(root: Path) -> tuple[set[str], list[str]]:
    """The top-level names the project's code imports, less the standard library and the project's
    own modules, and the files that could not be read as Python (a warning, not a stop)."""
    found, own, unreadable = set(), set(), []
    for folder, subfolders, files in os.walk(root):
        # A virtual environment inside the project is not its code, nor is anything hidden.
        subfolders[:] = sorted(
            d
            for d in subfolders
            if not d.startswith(".") and d not in NOT_SCANNED and not (Path(folder, d) / "pyvenv.cfg").exists()
        )
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder, name)
            own.add(path.relative_to(root).parts[0].removesuffix(".py"))
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, OSError) as e:
                unreadable.append(f"{path.relative_to(root)} ({e.__class__.__name__}: {e})")
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found.update(alias.name.partition(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.partition(".")[0])
    return found - own - set(sys.stdlib_module_names) - {"__future__"}, unreadable


def requirements(names: set[str]) -> list[str]:
    """`name==version` for each installed distribution that provides one of these import names.

    The standard library alone, offline: packages_distributions() reads every installed wheel's
    file list (pipreqs, which did this before, needs Python < 3.13, and its offline mode reads
    top_level.txt files, which the wheels of torch and wandb no longer ship)."""
    installed = importlib.metadata.packages_distributions()
    found = set()
    for name in names:
        for dist in installed.get(name) or [name]:
            try:
                found.add(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                found.add(f"{dist}  # imported as `{name}`, not installed here: check its name on PyPI")
    return sorted(found, key=str.lower)


# ----------------------------------------------------------------------------------------------
# The tables: usage (one per argument group, one row per option), metrics, tags, thresholds


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def tags_table() -> str:
    """utils.TAGS, one row a tag."""
    return markdown_table(
        ["tag", "kind", "meaning"],
        [
            [f"`{t.pattern}`", ("error" if t.error else "info") + (", resumable" if t.resumable else ""), t.meaning]
            for t in utils.TAGS
        ],
    )


def thresholds_table(parser: options.Parser) -> str:
    actions = options.option_groups(parser)[options.THRESHOLDS].actions
    return markdown_table(
        ["flag", "default", "meaning"], [[f"`{a.option_strings[0]}`", f"{a.default:g}", a.help] for a in actions]
    )


def metrics_table() -> str:
    return markdown_table(
        ["metric", "computed by (torcheval)", "guessing baselines", "meaning"],
        [
            [
                f"`{m.name}`",
                f"`{m.torcheval}`" + "".join(f", {k}={v}" for k, v in m.options),
                ", ".join(kind for kind in utils.BASELINES if getattr(m, kind)) or "none",
                m.meaning,
            ]
            for m in utils.METRICS
        ],
    )


def type_cell(action: argparse.Action) -> str:
    kind = getattr(action.type, "kind", action.type) or str
    if action.choices:
        values = ", ".join(f"`{c}`" for c in action.choices)
        return f"one of {values}" if kind is str else f"{kind.__name__}, one of {values}"
    return action.type.describe() if isinstance(action.type, options.Validator) else kind.__name__


def default_cell(action: argparse.Action) -> str:
    if action.default is None:
        return "unset"
    return f"`{action.default:g}`" if isinstance(action.default, float) else f"`{action.default}`"


def help_cell(action: argparse.Action) -> str:
    """The help text without the "(default: ...)" that the table's own column already says."""
    text = re.sub(r"\s*\(default:?\s*%\(default\)s\)", "", action.help or "")
    return text % {**vars(action), "default": action.default}


def usage_tables(parser: options.Parser) -> str:
    sections = []
    for title, group in options.option_groups(parser).items():
        if group.actions:
            rows = [[f"`{a.option_strings[0]}`", type_cell(a), default_cell(a), help_cell(a)] for a in group.actions]
            intro = f"{group.description[0].upper()}{group.description[1:]}.\n\n" if group.description else ""
            sections.append(
                f"### {title}\n\n{intro}" + markdown_table(["option", "type", "default", "description"], rows)
            )
    return "\n\n".join(sections)


# ----------------------------------------------------------------------------------------------
# The stub


def project_parser() -> options.Parser:
    """main.py's parser, without torch (options.parser_of): the generator needs only the standard library."""
    return options.parser_of(HERE / "main.py")


def licence(root: Path) -> str:
    """The licence line: the LICENSE file's name for itself (its first line), or what to do without one."""
    path = root / "LICENSE"
    if not path.exists():
        return f"{TODO}: choose a licence and put it in `LICENSE`."
    name = path.read_text().strip().splitlines()[0].strip()
    return (
        f"{name}: see [LICENSE](LICENSE). {TODO}: put your name on its copyright line; the notice of "
        "the boilerplate this project grew from stays with the code taken from it."
    )


# The tables made from the code, by the name that marks them in a Markdown file (see marked()).
TABLES = {
    "usage": usage_tables,
    "metrics": lambda parser: metrics_table(),
    "tags": lambda parser: tags_table(),
    "thresholds": thresholds_table,
}
MARK = re.compile(r"<!-- generated: (\w+) .*?-->\n.*?\n<!-- end generated -->", re.DOTALL)


def marked(name: str, table: str) -> str:
    """A generated table between the marks that --tables finds it by (HTML comments: unseen on GitHub)."""
    start = f"<!-- generated: {name} (python generate_readme_stub.py --tables rewrites it) -->"
    return f"{start}\n{table}\n<!-- end generated -->"


def rewrite_tables(markdown: str, parser: options.Parser) -> tuple[str, list[str]]:
    """The Markdown with each marked table made anew from the code; and the names marked that are not tables."""
    unknown = []

    def table(found: re.Match) -> str:
        if found[1] not in TABLES:
            unknown.append(found[1])
            return found[0]
        return marked(found[1], TABLES[found[1]](parser))

    return MARK.sub(table, markdown), unknown


def default_tables_files(root: Path) -> list[Path]:
    """Those of README.md and the documents under docs/ that hold generated tables (README.md alone when none
    does, to say so)."""
    candidates = [root / "README.md", *sorted(root.glob("docs/*.md"))]
    return [path for path in candidates if path.is_file() and MARK.search(path.read_text())] or [root / "README.md"]


def rewrite_files(paths: list[Path]) -> int:
    """--tables: each file's marked tables rewritten in place; 1 if a file cannot be, else 0."""
    status = 0
    for path in paths:
        try:
            text = path.read_text()
        except OSError as e:
            print(f"Error: cannot read {path}: {e.strerror or e}", file=sys.stderr)
            status = 1
            continue
        new, unknown = rewrite_tables(text, project_parser())
        if unknown or not MARK.search(text):
            why = f"unknown tables marked: {', '.join(unknown)}" if unknown else "no generated table is marked in it"
            print(f"Error: {path}: {why} (known: {', '.join(TABLES)}).", file=sys.stderr)
            status = 1
            continue
        if new != text:
            atomic_write(path, lambda f, new=new: f.write(new.encode()))
        print(f"{path}: {len(MARK.findall(text))} tables, " + ("rewritten" if new != text else "already current"))
    return status


def render(parser: options.Parser, requirements: list[str], licence_line: str) -> str:
    packages = "\n".join("    " + r for r in requirements)
    return f"""# TODO: project title

{TODO}: say in a paragraph what the project studies and what it found.

## Requirements

Python 3.10 to 3.13 and these packages (the versions this stub was generated with,
on Python {platform.python_version()}):

{packages}

Install them with `pip install -r requirements.txt`.

## Usage

    python main.py --help

{TODO}: the commands that reproduce your results, and what they print.

Every option, from `main.get_parser()`: the hyper-parameters in `main.py`, the rest in
`boilerplate/options.py`. Options in the `hyper-parameters` group name the W&B
group, so runs that differ only by `--seed` land in one group.

{marked("usage", usage_tables(parser))}

## Metrics

Measured on each split (`train`, `val`, `test`) every epoch, from `utils.METRICS`; a metric's
guessing baselines are what the `Random guessing` and `Most probable guessing` tags compare it with.

{marked("metrics", metrics_table())}

## Tags

Each run is tagged by what happened in training. METRIC is one of the metrics above, SPLIT is
`train`, `val` or `test`; an **error** tag ends the run as Failed in W&B and with exit status 1, and
a **resumable** one keeps the run's checkpoint, which `--resume yes` continues from.

{marked("tags", tags_table())}

The detectors' thresholds:

{marked("thresholds", thresholds_table(parser))}

## Results

{TODO}: figures, tables, links to the W&B project.

The averages and errors over each group's seed replicates (mean, standard deviation, 95% confidence
interval), for a table in a paper, and each group's learning curves:

    python report.py OUTPUT_PATH --format markdown     # the run folders of --save yes
    python report.py --wandb ENTITY/PROJECT --format latex --plot curves.png
    python report.py OUTPUT_PATH --replicates 5        # the commands that run the missing seeds

## License

{licence_line}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a README.md stub for this project from its code.")
    parser.add_argument(
        "--output", type=Path, default=HERE / "README.md", help="file to write (default: README.md beside this script)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    parser.add_argument(
        "--tables",
        nargs="*",
        type=Path,
        metavar="FILE",
        help="only rewrite the generated tables (options, metrics, tags, thresholds) of these Markdown files, "
        "in place, where they are marked; no FILE: those of README.md and docs/*.md beside this script that mark some",
    )
    args = parser.parse_args(argv)
    if args.tables is not None:
        return rewrite_files(args.tables or default_tables_files(HERE))

    if args.output.exists() and not args.force:
        print(
            f"Error: {args.output} exists; not overwritten. Delete it, pass --force to overwrite it, or "
            "--output to write elsewhere.",
            file=sys.stderr,
        )
        return 1
    names, unreadable = imports(HERE)
    for problem in unreadable:
        print(f"Warning: not read as Python, its imports are not in Requirements: {problem}", file=sys.stderr)
    found = requirements(names)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.output, lambda f: f.write(render(project_parser(), found, licence(HERE)).encode()))
    print(f"Wrote {args.output}: fill in what is marked TODO.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
