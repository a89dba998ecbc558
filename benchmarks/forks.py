"""What forking costs: seven forks a researcher makes first, each applied to a clean copy of the committed
project, counted (the places changed, the lines added and removed) and tested (the whole suite, and which
tests broke outside tests/test_demo.py and tests/demo.py, the two files a fork edits by design).

    python benchmarks/forks.py                 # every fork: about 12 minutes each on 2 CPU cores
    python benchmarks/forks.py --only cnn flag --no-tests   # count only

The figures and what they showed are in docs/forking.md.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_FILES = ("tests/test_demo.py", "tests/demo.py")

# Each fork: (what a researcher does, {file: [(old, new), ...]}); each old text stands once in its file.
FLAGS_END = "\n\ndef get_parser("  # the end of main.py's add_hyperparameters: a new flag goes before it
STEP = "        optimizer.step()\n"


def flag(line: str) -> tuple[str, str]:
    """A hyper-parameter added at the end of main.py's add_hyperparameters."""
    return FLAGS_END, f"    hyper.add_argument({line})\n" + FLAGS_END


FORKS = {
    "flag": (
        "a hyper-parameter: label smoothing in the loss",
        {
            "main.py": [
                flag(
                    '"--label_smoothing", type=Number(float, min=0, max=1), default=0.0, '
                    'help="label smoothing of the cross-entropy"'
                ),
                (
                    "    return F.cross_entropy(logits, labels)\n",
                    "    return F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)\n",
                ),
            ],
        },
    ),
    "cnn": (
        "a CNN: two convolutions before the --hidden layers, and their --channels",
        {
            "main.py": [
                flag('"--channels", type=Widths(), default="16,32", help="channels of the convolutions"'),
                (
                    "    layers, width = [nn.Flatten()], math.prod(data.input_shape)\n",
                    "    layers, channels = [], data.input_shape[0]\n"
                    "    for c in args.channels:\n"
                    "        layers += [nn.Conv2d(channels, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]\n"
                    "        channels = c\n"
                    "    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]\n"
                    "    width = channels * 16\n",
                ),
            ],
        },
    ),
    "metric": (
        "a metric (macro precision), a confusion matrix of the test split, and a per-batch wandb.log",
        {
            "utils.py": [
                (
                    "METRIC_NAMES = tuple(",
                    'METRICS += (Metric("precision", "multiclass_precision", (("average", "macro"),), '
                    '"macro precision"),)\nMETRIC_NAMES = tuple(',
                )
            ],
            "main.py": [
                ("import torch\n", "import torch\nimport wandb\n"),
                (STEP, STEP + '        wandb.log({"batch/lr": optimizer.param_groups[0]["lr"]})\n'),
                (
                    "    return torch.cat(predictions), torch.cat(labels), loss / len(batches)\n",
                    "    predictions, labels = torch.cat(predictions), torch.cat(labels)\n"
                    '    if split == "test":  # each epoch\'s: W&B shows the last\n'
                    '        wandb.log({"test/confusion": wandb.plot.confusion_matrix(y_true=labels.tolist(), '
                    "preds=predictions.tolist())})\n"
                    "    return predictions, labels, loss / len(batches)\n",
                ),
            ],
        },
    ),
    "disk": (
        "a Dataset that reads each sample from disk as it is asked for (the DataLoader path)",
        {
            "main.py": [
                ("import torch\n", "import numpy as np\nimport torch\n"),
                (
                    "from torch.utils.data import TensorDataset\n",
                    "from torch.utils.data import Dataset, TensorDataset\n",
                ),
                (
                    "def load_data(args: Namespace) -> Data:\n",
                    "class FromDisk(Dataset):\n"
                    '    """MNIST read one sample at a time from its files, as a dataset too large for memory is."""\n\n'
                    "    def __init__(self, images: Path, labels: Path):\n"
                    "        self.images = np.memmap(images, np.uint8, 'r', offset=16).reshape(-1, 1, 28, 28)\n"
                    "        self.targets = torch.from_numpy(np.fromfile(labels, np.uint8, offset=8).astype(np.int64))\n\n"
                    "    def __len__(self) -> int:\n"
                    "        return len(self.targets)\n\n"
                    "    def __getitem__(self, i: int) -> tuple:\n"
                    "        x = torch.from_numpy(np.array(self.images[i], np.float32)).div_(255).sub_(MNIST_MEAN)\n"
                    "        return x.div_(MNIST_STD), self.targets[i]\n\n\n"
                    "def load_data(args: Namespace) -> Data:\n",
                ),
                (
                    "        splits[name] = TensorDataset(x, ds.targets)\n",
                    "        prefix = 'train' if train else 't10k'\n"
                    "        splits[name] = FromDisk(raw / f'{prefix}-images-idx3-ubyte', raw / f'{prefix}-labels-idx1-ubyte')\n",
                ),
            ],
        },
    ),
    "schedule": (
        "a schedule of its own: linear warm-up over --warmup_epochs then cosine decay, resumed exactly",
        {
            "main.py": [
                flag('"--warmup_epochs", type=Number(int, min=0), default=0, help="warm-up epochs"'),
                (
                    "    return schedules.standard(optimizer, args.lr_schedule, args.warmup, steps)\n",
                    "    warmup = args.warmup_epochs * steps // args.epochs\n"
                    "    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup\n"
                    "        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))\n",
                ),
            ],
        },
    ),
    "best": (
        "the best model (best.pt, by val/accuracy) and early stopping after --patience epochs: built in "
        "(--monitor, --patience, --save yes), nothing to change",
        {},
    ),
    "csv": (
        "a 3-class tabular dataset read from CSV files (and the tests' data writer for it)",
        {
            "main.py": [
                ("import torch\n", "import numpy as np\nimport torch\n"),
                (
                    "def load_data(args: Namespace) -> Data:\n",
                    "def load_data(args: Namespace) -> Data:\n"
                    '    """Points in 5 dimensions, 3 classes: train.csv and test.csv under --data_path."""\n'
                    "    splits = {}\n"
                    '    for split in ("train", "test"):\n'
                    "        try:\n"
                    '            rows = np.loadtxt(Path(args.data_path) / f"{split}.csv", delimiter=",", dtype=np.float32, ndmin=2)\n'
                    "        except (OSError, ValueError) as e:\n"
                    '            path = Path(args.data_path) / f"{split}.csv"\n'
                    '            raise StartError(f"{path} could not be read ({described(e)}); pass --data_path "\n'
                    '                                   "to the folder that holds train.csv and test.csv") from None\n'
                    "        splits[split] = TensorDataset(torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, -1]).long())\n"
                    '    return Data(splits, classes=["low", "mid", "high"], input_shape=(5,))\n\n\n'
                    "def load_mnist(args: Namespace) -> Data:\n",
                ),
            ],
            "tests/demo.py": [
                (
                    'def write_dataset(folder: Path, train: int = TINY_TRAIN, test: int = 200, shuffle: str = "", seed: int = 0) -> Path:\n',
                    'def write_dataset(folder: Path, train: int = TINY_TRAIN, test: int = 200, shuffle: str = "", seed: int = 0) -> Path:\n'
                    "    rng = np.random.default_rng(seed)\n"
                    "    folder.mkdir(parents=True, exist_ok=True)\n"
                    '    for split, n in (("train", train), ("test", test)):\n'
                    "        labels = np.arange(n) % 3\n"
                    "        points = rng.normal(0, 0.3, (n, 5)) + np.eye(3, 5)[labels] * 3\n"
                    "        labels = rng.permutation(labels) if shuffle == split else labels\n"
                    '        np.savetxt(folder / f"{split}.csv", np.column_stack([points, labels]), delimiter=",")\n'
                    "    return folder\n\n\n"
                    'def write_mnist(folder: Path, train: int = TINY_TRAIN, test: int = 200, shuffle: str = "", seed: int = 0) -> Path:\n',
                ),
                (
                    "    path = folder / \"MNIST\" / \"raw\" / f\"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte\"\n"
                    "    path.write_bytes(path.read_bytes()[:1000])\n",
                    '    path = folder / f"{split}.csv"\n    path.write_text(path.read_text()[:1000] + "x")\n',
                ),
                (
                    '    path = folder / "MNIST" / "raw" / "train-labels-idx1-ubyte"\n'
                    "    path.write_bytes(path.read_bytes()[:-1] + bytes([12]))\n",
                    '    path = folder / "train.csv"\n    path.write_text(path.read_text().rstrip("\\n").rsplit(",", 1)[0] + ",12\\n")\n',
                ),
                ("CLASSES = 10\n", "CLASSES = 3\n"),
                ("INPUT_SHAPE = (1, 28, 28)", "INPUT_SHAPE = (5,)"),
                ('DATA_FOLDER = "MNIST/raw"', 'DATA_FOLDER = "train.csv"'),
            ],
        },
    ),
}


def apply(folder: Path, edits: dict[str, list[tuple[str, str]]]) -> None:
    for name, pairs in edits.items():
        path = folder / name
        text = path.read_text()
        for old, new in pairs:
            if text.count(old) != 1:
                raise SystemExit(f"{name}: the fork's anchor stands {text.count(old)} times, not once: {old[:60]!r}")
            text = text.replace(old, new)
        path.write_text(text)


def counted(folder: Path) -> tuple[int, int, int]:
    """The places (hunks), lines added and lines removed, outside the demo's two test files and the
    generated tables in docs/."""
    diff = subprocess.run(
        ["git", "diff", "-U0", "--", ".", ":!docs", *(f":!{name}" for name in DEMO_FILES)],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    hunks = sum(line.startswith("@@") for line in diff)
    added = sum(line.startswith("+") and not line.startswith("+++") for line in diff)
    removed = sum(line.startswith("-") and not line.startswith("---") for line in diff)
    return hunks, added, removed


def broken(folder: Path) -> tuple[list[str], str, list[str]]:
    """The tests that failed or errored, pytest's last line, and its summary line of each (the reason)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    reasons = re.findall(r"^(?:FAILED|ERROR) .*$", done.stdout, re.MULTILINE)
    failed = [reason.split()[1] for reason in reasons]
    return failed, (done.stdout.strip().splitlines() or [""])[-1], reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(FORKS), default=list(FORKS))
    parser.add_argument("--no-tests", action="store_true", help="count the changes, run no tests")
    args = parser.parse_args(argv)
    print("| fork | places | lines +/- | tests broken outside test_demo.py | suite |")
    print("|---|---|---|---|---|")
    reasons = []
    for name in args.only:
        what, edits = FORKS[name]
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "fork"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True)
            apply(folder, edits)
            # As the README asks after a change to a flag, a tag or a metric: the generated tables rewritten.
            subprocess.run([sys.executable, "generate_readme_stub.py", "--tables"], cwd=folder, capture_output=True)
            hunks, added, removed = counted(folder)
            failed, last, why = ([], "not run", []) if args.no_tests or not edits else broken(folder)
            outside = [test for test in failed if not test.startswith(DEMO_FILES)]
            print(f"| {name}: {what} | {hunks} | +{added}/-{removed} | {len(outside)} {outside} | {last} |", flush=True)
            reasons += [f"{name}: {line}" for line in why]
    print("\n".join(["", "Why each broke:", *reasons]) if reasons else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
