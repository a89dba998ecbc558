"""Shared fixtures: tiny MNIST files for torchvision's real loader, W&B offline, runs of main.py."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # real W&B, writing its run files locally
# The real MNIST, never downloaded by the tests.
REAL_MNIST = Path(os.environ.get("MNIST_DATA", ROOT.parent / "shared" / "data"))


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images and labels in MNIST's IDX format, as torchvision's MNIST class reads them."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">iiii", 2051, *images.shape) + images.astype(np.uint8).tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Easy digits: class c lights a 6x6 square of its own at one of ten places, over noise."""
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, c in enumerate(labels):
        r, q = 2 + 12 * (c // 5), 1 + 5 * (c % 5)
        images[i, r:r + 6, q:q + 6] = 255
    return images, labels


def make_dataset(folder: Path, shuffle: str = "") -> Path:
    """Tiny digits; `shuffle` names the split ("train" or "t10k") whose labels are shuffled."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 200)):
        images, labels = digits(n, rng)
        write_idx(folder, prefix, images, rng.permutation(labels) if shuffle == prefix else labels)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """600 training and 200 test images that an MLP learns in an epoch or two."""
    return make_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def overfit_data(tmp_path_factory) -> Path:
    """As tiny_data, but the test labels are shuffled: what is learnt cannot carry over."""
    return make_dataset(tmp_path_factory.mktemp("overfit"), shuffle="t10k")


@pytest.fixture(scope="session")
def noise_data(tmp_path_factory) -> Path:
    """As tiny_data, but the training labels are shuffled: nothing can be learnt, only memorised."""
    return make_dataset(tmp_path_factory.mktemp("noise"), shuffle="train")


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Real W&B in offline mode, writing into this test's own folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    yield tmp_path
    import wandb

    wandb.teardown()  # W&B reads its settings once per process: the next test's WANDB_DIR needs a fresh start


def small_run(data: Path, out: Path, *extra: str) -> list[str]:
    """The command-line arguments of a short run on tiny data, saved under `out`."""
    return ["--data_path", str(data), "--val_size", "100", "--batch_size", "32", "--epochs", "2",
            "--hidden", "64", "--device", "cpu", "--verbose", "0", "--save", "yes",
            "--output_path", str(out), *extra]


def results(out: Path) -> tuple[Path, dict]:
    """The one run folder saved under `out`, and its results.json (which parses: written whole or not at all)."""
    [path] = out.glob("*/*/results.json")
    return path.parent, json.loads(path.read_text())


def start_main(args: list[str], **kwargs) -> subprocess.Popen:
    """`python main.py ARGS` as a real process, in a session of its own like a shell job."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=kwargs.pop("cwd", ROOT),
                            env=env, stdout=subprocess.PIPE, stderr=kwargs.pop("stderr", subprocess.PIPE),
                            text=True, start_new_session=True, **kwargs)


def training_process(pid: int) -> int:
    """The pid of main.py's training process: its child started by multiprocessing's spawn."""
    for _ in range(100):
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError("no training process found")
