"""Checkpoints: everything a resumed run needs to go on as if it had never stopped. The training state
is a named list of stateful objects (the model, the optimizer, the batches' generator, and whatever a
fork adds: a scheduler, a GradScaler, an EMA of the weights), kept by their state_dict or a
generator's state, beside the process's random generators, the history and the tags."""

import contextlib
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .errors import StartError, described
from .files import atomic_write


def seed_everything(seed: int) -> None:
    """torch, and the generators a fork's own code may draw from (augmentation with numpy or random)."""
    torch.manual_seed(seed)
    np.random.seed([seed % 2**32, seed // 2**32])  # numpy's legacy seed takes 32-bit words
    random.seed(seed)


def state_of(thing: object) -> object:
    """What a checkpoint keeps of a piece of training state: its state_dict (a model, an optimizer, a
    scheduler, a GradScaler), or a random generator's state."""
    return thing.get_state() if isinstance(thing, torch.Generator) else thing.state_dict()


def restore(thing: object, state: object) -> None:
    if isinstance(thing, torch.Generator):
        thing.set_state(state)
    else:
        thing.load_state_dict(state)


# Where a snapshot's tensors load: the random generators' states must be CPU tensors (on a GPU,
# set_rng_state refused them: "RNG state must be a torch.ByteTensor"), and load_state_dict copies the
# model's and the optimizer's onto their parameters' device itself.
HOST = torch.device("cpu")


def snapshot(epoch: int, stateful: dict[str, object], history: list, tags: list) -> dict:
    """What a checkpoint keeps: each piece of `stateful`, the process's random generators, the history and
    the tags, the number of processes that trained. Only tensors and plain values, so that load() can
    refuse anything else."""
    numpy_rng = np.random.get_state(legacy=False)
    return {
        "epoch": epoch,
        "stateful": {name: state_of(thing) for name, thing in stateful.items()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python_rng": random.getstate(),
        "numpy_rng": {
            **numpy_rng,
            "state": {
                "key": torch.from_numpy(numpy_rng["state"]["key"].astype(np.int64)),
                "pos": numpy_rng["state"]["pos"],
            },
        },
        "history": history,
        "tags": tags,
        "world_size": distributed.world(),
    }


def restore_all(state: dict, stateful: dict[str, object]) -> tuple[int, list, list]:
    """Puts a snapshot back into each piece of `stateful` and the random generators; returns the epoch
    it was taken after, the history and the tags."""
    if missing := set(stateful) - set(state["stateful"]):  # a piece added since the checkpoint was written
        raise KeyError(f"it holds no {', '.join(sorted(missing))}")
    for name, thing in stateful.items():
        restore(thing, state["stateful"][name])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    numpy_rng = state["numpy_rng"]
    np.random.set_state(
        {
            **numpy_rng,
            "state": {"key": numpy_rng["state"]["key"].numpy().astype(np.uint32), "pos": numpy_rng["state"]["pos"]},
        }
    )
    return state["epoch"], state["history"], state["tags"]


def save(path: Path, epoch: int, stateful: dict[str, object], history: list, tags: list) -> None:
    """Writes the checkpoint (a snapshot) whole or not at all."""
    state = snapshot(epoch, stateful, history, tags)
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: Path, stateful: dict[str, object]) -> tuple[int, list, list]:
    """Restores what save() wrote into each piece of `stateful`; returns the epoch it was written after,
    the history and the tags. weights_only: a checkpoint found on shared storage is data, and must not
    run code as it loads."""
    try:
        state = torch.load(path, map_location=HOST, weights_only=True)
        done = restore_all(state, stateful)
    except pickle.UnpicklingError:  # what weights_only refuses: the file would run code as it loads
        unsafe = []
        with contextlib.suppress(Exception):  # torch's own list of what it would call; a damaged file has none
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        what = f"it calls {', '.join(unsafe)}" if unsafe else "objects that run code on loading"
        raise StartError(
            f"the checkpoint {path} holds more than tensors and plain values ({what}), so it "
            "was not loaded. A checkpoint this code wrote never does: delete the file (the run "
            "then trains again from its start), and find out what wrote it."
        ) from None
    except Exception as e:  # noqa: BLE001 (truncated, empty, another model's: the message names it)
        raise StartError(
            f"the checkpoint {path} could not be loaded ({described(e)}). It may be truncated, "
            "written by another version of the code, or not a checkpoint at all; delete it "
            "to train this run again from its start."
        ) from None
    if state.get("world_size", 1) != distributed.world():
        print(
            f"Warning: this run was trained by {state.get('world_size', 1)} processes and goes on with "
            f"{distributed.world()}: each draws other batches from here on, so it will not equal a run never stopped.",
            file=sys.stderr,
        )
    return done


def load_weights(model: torch.nn.Module, path: Path, device: torch.device) -> None:
    """Weights saved before into `model` (--init_from): a state_dict (best.pt, model.pt, a model artifact's
    file) or a checkpoint's model, loaded weights_only and checked against the model's own names and
    shapes. A folder holding one .pt file is that file: W&B's artifact.download() gives the folder. A
    StartError says what does not fit."""
    if path.is_dir():
        found = sorted(path.glob("*.pt"))
        if len(found) != 1:
            which = f"name one of its files: {', '.join(f.name for f in found)}" if found else "it holds no .pt file"
            raise StartError(f"--init_from {path} is a folder: {which}.")
        path = found[0]
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 (missing, truncated, not torch's, unsafe: the message names it)
        raise StartError(f"--init_from {path} could not be loaded ({described(e)}).") from None
    if isinstance(state, dict) and isinstance(state.get("stateful"), dict):  # a checkpoint: its model
        state = state["stateful"].get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StartError(f"--init_from {path} holds no model weights (a state_dict of tensors).")
    mine = model.state_dict()
    problems = [f"{name} missing" for name in mine if name not in state]
    problems += [f"{name} is not the model's" for name in state if name not in mine]
    problems += [
        f"{name} is {tuple(state[name].shape)}, the model's {tuple(tensor.shape)}"
        for name, tensor in mine.items()
        if name in state and state[name].shape != tensor.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise StartError(f"--init_from {path} does not fit the model built from these options: {shown}.")
    model.load_state_dict(state)
