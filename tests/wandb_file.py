"""Read a W&B run back from its offline file, as `wandb sync` would upload it.

The file `run-ID.wandb` is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version),
then 32 KiB blocks of records, each with a 7-byte header (CRC32C, length, type: full, first,
middle or last chunk), whose payloads are serialised `wandb_internal_pb2.Record` messages.
wandb no longer ships a Python reader for it, so the tests carry this small one.
"""

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, payload = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # too small for a record header: the writer padded the block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        payload = chunk if kind in (FULL, FIRST) else payload + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(payload)
            yield record


@dataclass
class Run:
    group: str = ""
    sweep_id: str = ""
    tags: list = field(default_factory=list)
    tag_updates: list = field(default_factory=list)  # every tag list the run was given, in order
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None
    preempting: bool = False  # run.mark_preempting() was called
    step_metrics: dict = field(default_factory=dict)  # define_metric: metric or glob -> its step metric
    output: str = ""  # what the process printed: W&B's Logs tab
    stats: list = field(default_factory=list)  # system metrics, one dict per sample
    artifacts: list = field(default_factory=list)  # logged artifacts: name, type, aliases, metadata, files


def read_run(path: Path) -> Run:
    run = Run()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group = record.run.run_group or run.group
            run.sweep_id = record.run.sweep_id or run.sweep_id
            run.tags = list(record.run.tags) or run.tags
            if record.run.tags and (not run.tag_updates or run.tag_updates[-1] != run.tags):
                run.tag_updates.append(run.tags)
            run.config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            run.config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            run.history.append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            run.summary.update(
                {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in record.summary.update}
            )
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "preempting":
            run.preempting = True
        elif kind == "output_raw":
            run.output += record.output_raw.line
        elif kind == "stats":
            run.stats.append({i.key: json.loads(i.value_json) for i in record.stats.item})
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": list(a.aliases),
                    "metadata": json.loads(a.metadata or "{}"),
                    "files": {entry.path: entry.size for entry in a.manifest.contents},
                }
            )
        elif kind == "metric":
            run.step_metrics[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return run


def find_run(wandb_dir: Path, run_id: str) -> Run:
    [run] = find_runs(wandb_dir, run_id)
    return run


def find_runs(wandb_dir: Path, run_id: str, prefix: str = "") -> list[Run]:
    """Every W&B run file of this id, oldest first: offline, a resumed run writes a second one (in a folder
    named by the second it started, and a "-1", "-2"... after it where sittings start within one second)."""
    sitting = re.compile(rf"(.*)-{re.escape(run_id)}(?:-(\d+))?")  # the start's time, then the "-N"
    order = {}
    for path in Path(wandb_dir).glob(f"wandb/{prefix}*-{run_id}*/run-{run_id}.wandb"):
        # W&B's service, killed or frozen as it opened the file, leaves it without its header (as CI once
        # saw): that sitting recorded nothing. Any other file that is not a run file fails read_run.
        if path.stat().st_size < HEADER:
            continue
        if match := sitting.fullmatch(path.parent.name):
            order[path] = (match[1], int(match[2] or 0))
    return [read_run(path) for path in sorted(order, key=order.get)]


def whole_run(wandb_dir: Path, run_id: str) -> Run:
    """One run across its sittings (offline, each resume writes a file of its own), as W&B's server
    joins them: the history of each in turn, the tags and exit code of the last."""
    sittings = find_runs(wandb_dir, run_id)
    assert sittings, f"no W&B run {run_id} under {wandb_dir}"
    whole = Run()
    for run in sittings:
        whole.group, whole.sweep_id = run.group or whole.group, run.sweep_id or whole.sweep_id
        whole.tags, whole.exit_code = run.tags or whole.tags, run.exit_code
        whole.config.update(run.config)
        whole.summary.update(run.summary)
        whole.step_metrics.update(run.step_metrics)
        whole.history += run.history
        whole.preempting |= run.preempting
    return whole
