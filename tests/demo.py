"""The demo as the behaviour tests see it: the one place a fork edits when it changes its data or its
model. The behaviour tests (tagging, resume, faults, sweeps, W&B) train on data written here, with
arguments given here, and name neither the data's format nor the model's flags; what pins the demo's
own choices (its defaults, group name, hyper-parameters, weight shapes, requirements) is test_demo.py.

Here the data is MNIST's, in its IDX files read by torchvision's real loader (main.load_data), and the
model the MLP of --hidden.
"""

import os
import struct
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Extra arguments, each a kind of run the behaviour tests need.
SLOW = ["--batch_size", "8", "--hidden", "1024"]  # epochs long enough for a signal to land mid-epoch
CRAWL = ["--batch_size", "1", "--hidden", "1024,1024"]  # each step a second's fraction: an epoch takes long
HUGE_MODEL = ["--hidden", "99999999,99999999"]  # too large for any machine (a 10^16-weight layer), whatever the input
# Whole-split batches through a wide model: a stop lands mid-batch, and the batch takes a while to end.
HEAVY_BATCHES = ["--batch_size", "600", "--hidden", "4096,4096"]
RANDOM_LAYERS = ["--dropout", "0.1"]  # a model that draws random numbers as it trains


def data_and_model(data: Path) -> list[str]:
    """The arguments that choose write_dataset's data and a small model that learns it in an epoch or two."""
    return ["--data_path", str(data), "--val_size", "100", "--batch_size", "32", "--hidden", "64"]


def small_run(data: Path, out: Path, *extra: str) -> list[str]:
    """The command-line arguments of a short run on write_dataset's data, saved under `out`."""
    return [
        *data_and_model(data),
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--verbose",
        "0",
        "--save",
        "yes",
        "--output_path",
        str(out),
        *extra,
    ]


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images and labels in MNIST's IDX format, as torchvision's MNIST class reads them."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">iiii", 2051, *images.shape) + images.astype(np.uint8).tobytes()
    )
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes()
    )


def digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Easy digits: class c lights a 6x6 square of its own at one of ten places, over noise."""
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, c in enumerate(labels):
        r, q = 2 + 12 * (c // 5), 1 + 5 * (c % 5)
        images[i, r : r + 6, q : q + 6] = 255
    return images, labels


TINY_TRAIN = 600  # write_dataset's training samples by default, 100 of them held out for validation


def write_dataset(folder: Path, train: int = TINY_TRAIN, test: int = 200, shuffle: str = "", seed: int = 0) -> Path:
    """Tiny data that a model learns in an epoch or two; `shuffle` names the split ("train" or "test")
    whose labels are shuffled, so that nothing learnt carries over to it."""
    rng = np.random.default_rng(seed)
    for split, prefix, n in (("train", "train", train), ("test", "t10k", test)):
        images, labels = digits(n, rng)
        write_idx(folder, prefix, images, rng.permutation(labels) if shuffle == split else labels)
    return folder


def damage(folder: Path, split: str) -> Path:
    """Truncate one of a split's data files, as an interrupted copy would; returns it."""
    path = folder / "MNIST" / "raw" / f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    return path


def label_beyond_the_classes(folder: Path) -> None:
    """The last training label made 12, with 10 classes."""
    path = folder / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1] + bytes([12]))


CLASSES = 10
INPUT_SHAPE = (1, 28, 28)  # one sample's, as load_data describes it
DATA_FOLDER = "MNIST/raw"  # where a missing-data message must point, under --data_path


def find_real_mnist() -> Path:
    """Where a test finds the real MNIST: $MNIST_DATA if set, else where `python main.py` looks
    (data/, its --data_path default), else this machine's ../shared/data. Where none holds it, data/:
    the run downloads it there, as `python main.py` does."""
    if "MNIST_DATA" in os.environ:
        return Path(os.environ["MNIST_DATA"])
    default, shared = ROOT / "data", ROOT.parent / "shared" / "data"
    holds = [folder for folder in (default, shared) if (folder / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()]
    return holds[0] if holds else default
