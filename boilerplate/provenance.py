"""Which code trained a run: a fingerprint of the experiment's source (main.py or a fork's, utils.py and
this package), kept with the run's constants (`code/version` in results.json and W&B's config). A group is
named by the hyper-parameters alone, so a model or a loss changed in main.py lands its runs in the
group of the runs before the change; report.py warns of a group whose replicates ran different code.

The fingerprint reads each file's syntax tree without its docstrings: a comment, a docstring or a
reformatting changes no result and leaves it as it was; any change to the code itself changes it."""

import ast
import hashlib
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path

import utils

PACKAGE = Path(__file__).resolve().parent


def code_version(parts: Iterable[Callable]) -> str:
    """12 hex digits naming the code of the files that define the experiment's `parts` (main.py's functions,
    or a fork's), utils.py and the package; a file that cannot be read or parsed counts as such."""
    # A decorated part (torch.inference_mode's) is named by its own file, not the decorator's; the files are
    # taken by name, not place: a project in a folder that sorts before site-packages' (CI's checkout) and
    # its copy in /tmp have one version.
    scripts = set(map(source_file, parts))
    files = [*sorted(map(fingerprinted, scripts)), fingerprinted(Path(utils.__file__))]
    files += sorted(map(fingerprinted, PACKAGE.glob("*.py")))
    digest = hashlib.sha256()
    for name, tree in files:
        digest.update(f"{name}\0{tree}\0".encode())
    return digest.hexdigest()[:12]


def source_file(part: Callable) -> Path:
    try:
        return Path(inspect.getsourcefile(inspect.unwrap(part)) or "")
    except TypeError:  # a builtin (C) function: no file of Python to read
        return Path("")


def fingerprinted(path: Path) -> tuple[str, str]:
    try:
        tree = ast.dump(without_docstrings(ast.parse(path.read_text(encoding="utf-8"))))
    except (OSError, SyntaxError, ValueError) as e:
        tree = f"unreadable: {type(e).__name__}"
    return path.name, tree


def without_docstrings(tree: ast.Module) -> ast.Module:
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        body = node.body if isinstance(node, documented) else None
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0].value, "value", None), str):
            node.body = body[1:] or [ast.Pass()]
    return tree
