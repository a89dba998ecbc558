"""report.py: averages and errors over replicates, from real run folders written by real runs, and from
W&B's server (a local stand-in answering the queries wandb.Api sends) holding the same runs, logged online
by those runs. The figures are checked against results.json and scipy's t distribution."""

import csv
import importlib.util
import io
import json
import math
import os
import shlex
import shutil
import statistics
import time
from pathlib import Path

import pytest
import scipy.stats
import wandb
from test_training import Preempted

import main
import report
from boilerplate import provenance, replicates
from conftest import fork, small_run, start_main
from wandb_server import ENTITY, WandbServer

PROJECT = "boilerplate-tests"
LOW, HIGH = "0.001", "0.01"  # the two groups' learning rates


def train(argv: list[str], preempt: bool = False) -> int:
    """One run in this process (as test_training does); `preempt`: SIGTERM in its second epoch, an error tag."""
    with pytest.MonkeyPatch.context() as patch:
        if preempt:
            Preempted(patch).start(2)
        return main.main([*argv, "--watchdog", "no"])


def write_runs(data: Path, out: Path, sweep: str = "") -> None:
    """Two groups (two learning rates) of three seeds, one of them preempted (failed, error tag), and a
    third group whose only run fails with NaN loss; the first groups' runs in a sweep when one is named."""
    for lr, seed, preempt in [(LOW, 0, False), (LOW, 1, False), (LOW, 2, False), (HIGH, 0, False)] + [
        (HIGH, 1, False),
        (HIGH, 2, True),
    ]:
        if sweep:  # as `wandb agent` sets it (an empty one W&B refuses, even with W&B off)
            os.environ["WANDB_SWEEP_ID"] = sweep
        try:
            train(small_run(data, out, "--epochs", "3", "--lr", lr, "--seed", str(seed)), preempt)
        finally:
            os.environ.pop("WANDB_SWEEP_ID", None)
    train(small_run(data, out, "--optimizer", "sgd", "--lr", "1e30", "--epochs", "3"))


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    write_runs(tiny_data, out)
    return out


def run_report(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = report.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def csv_rows(text: str) -> dict[str, dict]:
    return {row["group"]: row for row in csv.DictReader(io.StringIO(text))}


def expected(out: Path, at_best: str) -> dict[str, list[float]]:
    """Per group, `at_best` (best/...) of each finished run without an error tag, read straight from results.json."""
    values: dict[str, list[float]] = {}
    for path in out.rglob("results.json"):
        res = json.loads(path.read_text())
        values.setdefault(res["group"], [])
        if res["status"] == "finished":
            values[res["group"]].append(res["best"][at_best])
    return values


@pytest.mark.every_python
def test_one_row_per_group_with_the_mean_std_and_t_interval_of_its_finished_replicates(runs, capsys):
    code, out, err = run_report(capsys, runs, "--format", "csv")
    assert code == 0 and not err, err
    rows = csv_rows(out)
    assert len(rows) == 3
    for metric in ("val/accuracy", "test/accuracy", "test/f1", "test/loss"):
        for group, values in expected(runs, f"best/{metric}").items():
            row = rows[group]
            assert int(row[f"{metric} n"]) == len(values) == int(row["finished"])
            if not values:  # the NaN run's group: no replicate, no figures
                assert row[f"{metric} mean"] == "" and row["failed"] == "1"
                continue
            assert float(row[f"{metric} mean"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
            if len(values) > 1:
                std = statistics.stdev(values)
                half = scipy.stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
                assert float(row[f"{metric} std"]) == pytest.approx(std, abs=1e-12)
                assert float(row[f"{metric} ci_low"]) == pytest.approx(statistics.fmean(values) - half, abs=1e-9)
                assert float(row[f"{metric} ci_high"]) == pytest.approx(statistics.fmean(values) + half, abs=1e-9)
    by_lr = {row["lr"]: row for row in rows.values()}
    assert (by_lr[LOW]["finished"], by_lr[LOW]["failed"]) == ("3", "0")
    assert (by_lr[HIGH]["finished"], by_lr[HIGH]["failed"]) == ("2", "1")  # the preempted replicate left out
    assert set(rows[next(iter(rows))]) >= {"optimizer", "lr", "overfitting", "guessing"}  # what differs, what tags
    assert [row["lr"] for row in rows.values()][-1] == "1e+30"  # no finished replicate: ranked last


def test_t_quantile_is_students(capsys):
    for df in (1, 2, 3, 5, 10, 30, 100):
        assert replicates.t_quantile(0.975, df) == pytest.approx(scipy.stats.t.ppf(0.975, df), rel=1e-9)


def test_a_metric_is_read_at_the_best_epoch_or_the_last_where_a_run_kept_no_best():
    def run(best: dict) -> replicates.Replicate:
        last = {"val/accuracy": 0.8, "test/accuracy": 0.7, "train/loss": 0.1}
        return replicates.Replicate("r", "g", {}, "finished", ["Success"], best, last, lambda keys: [])

    kept = run({"best/epoch": 2, "best/val/accuracy": 0.9, "best/test/accuracy": 0.6})
    assert [kept.value(m, replicates.BEST) for m in ("val/accuracy", "test/accuracy", "train/loss")] == [0.9, 0.6, 0.1]
    assert kept.value("test/accuracy", replicates.LAST) == 0.7
    assert run({}).value("test/accuracy", replicates.BEST) == 0.7  # --monitor none: no best epoch kept
    assert run({}).value("test/f1", replicates.BEST) is None


def test_the_terminal_markdown_and_latex_tables(runs, capsys):
    code, out, _ = run_report(capsys, runs)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("Every run: epochs=") and "lr=" not in lines[0]
    header = next(line for line in lines if line.startswith("group "))
    assert header.split()[:3] == ["group", "optimizer", "lr"] and "val/accuracy" in header and "95% CI" in header
    assert "7 runs in 3 groups; metrics at each run's best epoch." in out

    code, out, _ = run_report(capsys, runs, "--format", "markdown", "--metric", "test/loss", "--at", "last")
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| group | optimizer | lr |") and "| test/loss | 95% CI |" in table[0]
    assert len(table) == 2 + 3 and all(line.count("|") == table[0].count("|") for line in table)
    assert "metrics at each run's last epoch" in out
    ranked = [line.split("|")[3].strip() for line in table[2:]]
    assert ranked[:2] == [HIGH, LOW] or ranked[:2] == [LOW, HIGH]  # by the mean test loss, lower first
    means = [float(line.split("|")[8].split("±")[0]) for line in table[2:4]]
    assert means == sorted(means)

    code, out, _ = run_report(capsys, runs, "--format", "latex", "--metric", "val/loss")
    rows = [line for line in out.splitlines() if line.startswith(("adam", "sgd"))]
    assert out.startswith("\\begin{tabular}") and out.rstrip().endswith("\\end{tabular}") and "\\toprule" in out
    best = min(
        csv_rows(run_report(capsys, runs, "--format", "csv", "--metric", "val/loss")[1]).values(),
        key=lambda row: float(row["val/loss mean"] or "inf"),
    )
    [bold] = [line for line in rows if "\\textbf" in line]  # the best group's mean, alone
    assert bold.startswith(f"{best['optimizer']} & {best['lr']} & ") and "$\\pm$" in bold and len(rows) == 3


def test_learning_curves_are_drawn_to_a_png(runs, tmp_path, capsys):
    code, out, err = run_report(capsys, runs, "--plot", tmp_path / "curves.png", "--metric", "val/loss")
    assert code == 0 and not err, err
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run_report(capsys, runs, "--plot", tmp_path / "no-folder" / "curves.png")
    assert code == 1 and "could not be written" in err and "Traceback" not in err
    code, out, err = run_report(capsys, runs, "--plot", tmp_path / "curves.txt")  # a format matplotlib lacks
    assert code == 2 and "argument --plot: matplotlib writes no .txt file: name one" in err and "png" in err, err
    assert not out and not (tmp_path / "curves.txt").exists()
    code, _, err = run_report(capsys, runs, "--plot", tmp_path / "curves.PDF")  # any case, as matplotlib reads it
    assert code == 0 and (tmp_path / "curves.PDF").read_bytes()[:5] == b"%PDF-", err


def test_the_missing_seeds_are_commands_that_run_them(runs, tiny_data, tmp_path, capsys):
    out = shutil.copytree(runs, tmp_path / "out")
    code, text, _ = run_report(capsys, out, "--replicates", "3")
    commands = [line for line in text.splitlines() if line.startswith("python main.py")]
    assert code == 0 and "# 4 runs bring every group to 3 finished replicates:" in text
    [high] = [c for c in commands if f"--lr {HIGH} " in c]
    argv = shlex.split(high)[2:]
    assert argv[-2:] == ["--seed", "3"]  # a new seed: 0, 1 and 2 (the preempted one) are taken
    assert f"--data_path {tiny_data}" in high and f"--output_path {out}" in high  # runnable as it stands
    assert train(argv) == 0
    code, text, _ = run_report(capsys, out, "--replicates", "3", "--format", "csv")
    assert csv_rows(text.split("\n\n")[0]) and f"--lr {HIGH} " not in text.split("\n\n")[-1]  # topped up
    by_lr = {row["lr"]: row for row in csv_rows(text.split("\n\n")[0]).values()}
    assert by_lr[HIGH]["finished"] == "3"


def test_runs_that_repeat_a_seed_are_one_replicate(runs, tiny_data, tmp_path, capsys):
    """A command run twice (one seed: the same numbers) is one replicate, not two: counted twice it would
    narrow the error bars with no new evidence. Each seed's value is the mean of its runs; the top-up
    counts seeds."""
    out = shutil.copytree(runs, tmp_path / "out")
    assert train(small_run(tiny_data, out, "--epochs", "3", "--lr", LOW, "--seed", "0")) == 0
    code, text, err = run_report(capsys, out, "--format", "csv")
    assert code == 0 and not err, err
    low = next(row for row in csv_rows(text).values() if row["lr"] == LOW)
    values = expected(runs, "best/val/accuracy")[low["group"]]  # the three seeds, each run once
    assert (low["finished"], low["failed"], low["val/accuracy n"]) == ("3 (+1 repeated seed)", "0", "3")
    assert float(low["val/accuracy std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
    code, text, _ = run_report(capsys, out)
    assert "8 runs in 3 groups" in text and "1 of them repeated a seed of their group" in text
    code, text, _ = run_report(capsys, out, "--replicates", "4")
    assert len([line for line in text.splitlines() if f"--lr {LOW} " in line]) == 1  # seed 3, the fourth


def test_a_group_whose_replicates_ran_other_code_is_named(runs, tiny_data, tmp_path, capsys):
    """A group is named by the hyper-parameters, not the code: a fork that changes its loss keeps the group
    of the runs before it. Their code/version differs, and the report warns; a fork that changes a comment
    and a docstring alone does not. A run resumed by other code says so as it goes on."""
    out = shutil.copytree(runs, tmp_path / "out")
    reworded = fork(tmp_path / "reworded", ("def loss_of(", "# a comment\n"), ("The loss of a batch;", "Truly: "))
    changed = fork(tmp_path / "changed", ("    return F.cross_entropy(logits, labels)", "    logits = logits + 0\n"))
    env = {"WANDB_MODE": "disabled"}
    for code, seed in ((reworded, "3"), (changed, "4")):
        proc = start_main(
            small_run(tiny_data, out, "--epochs", "3", "--lr", LOW, "--seed", seed), code / "main.py", env=env
        )
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        code, _, err = run_report(capsys, out)
        assert code == 0 and ("versions of the code" in err) == (seed == "4"), err
    low = next(row for row in csv_rows(run_report(capsys, out, "--format", "csv")[1]).values() if row["lr"] == LOW)
    assert f"Warning: group {low['group']}: its replicates were trained by 2 versions of the code" in err
    assert "(4 runs)" in err and "(1 run)" in err  # the seeds 0 to 3, and the changed fork's

    argv = small_run(tiny_data, tmp_path / "resumed", "--epochs", "3")
    assert train(argv, preempt=True) == 1
    proc = start_main([*argv, "--resume", "yes"], changed / "main.py", env=env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Warning: this run began under other code (code/version " in err, err


def test_the_code_version_is_the_same_wherever_the_project_lies(tmp_path):
    """code/version takes the files by name, not place: a project in a folder that sorts before a library's,
    and its copy in one that sorts after, have one version (until this test CI's checkout, in a folder that
    sorts before site-packages, and its copy in /tmp had two, and the report warned of one code). A part
    under torch's decorator is read from its own file, not torch's; a builtin part counts as one."""

    def loaded(path: Path):
        spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    library = tmp_path / "m" / "library.py"
    library.parent.mkdir()
    library.write_text("def loss(x):\n    return x\n")
    versions = {}
    for place, change in (("a", ""), ("z", ""), ("changed", " + 1")):
        script = tmp_path / place / "main.py"
        script.parent.mkdir()
        script.write_text(f"import torch\n\n\n@torch.inference_mode()\ndef evaluate(x):\n    return x{change}\n")
        versions[place] = provenance.code_version([loaded(script).evaluate, loaded(library).loss, max])
    assert versions["a"] == versions["z"] != versions["changed"], versions


def test_bad_input_is_named_with_the_documented_exit_status(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_report(capsys, empty)
    assert code == 1 and f"Error: no runs found in {empty}: runs keep their folder with --save yes" in err

    code, _, err = run_report(capsys, tmp_path / "missing")
    assert code == 1 and "is not a folder" in err

    damaged = shutil.copytree(runs, tmp_path / "damaged")
    [first, *_] = sorted(damaged.rglob("results.json"))
    first.write_text('{"history": [')  # cut short, as by a full disk
    code, out, err = run_report(capsys, damaged)
    assert code == 0 and f"Warning: skipped {first} (JSONDecodeError" in err
    assert "6 runs in 3 groups; 1 unreadable run folders skipped" in out

    code, _, err = run_report(capsys, runs, "--metric", "val/acc")
    assert code == 2 and "no run has the metric val/acc; the runs have: " in err and "test/accuracy" in err
    for argv in ([], [runs, "--wandb", "a/b"], [runs, "--sweep", "x"]):
        code, _, err = run_report(capsys, *argv)
        assert code == 2 and "Traceback" not in err

    server = WandbServer()
    server.close()  # nothing answers at its address now
    env = {**server.environment(), "WANDB_DIR": str(tmp_path)}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        code, _, err = run_report(capsys, "--wandb", f"{ENTITY}/{PROJECT}", "--timeout", "2")
    assert code == 1 and f"Error: W&B's server {server.url} is unreachable (" in err, err
    assert "Traceback" not in err

    gateway = WandbServer()  # an outage: a gateway answers for a server that is down
    gateway.outage = 503
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {**gateway.environment(), "WANDB_DIR": str(tmp_path)}.items():
                patch.setenv(name, value)
            code, _, err = run_report(capsys, "--wandb", f"{ENTITY}/{PROJECT}")
    finally:
        gateway.close()
    assert code == 1 and "is unreachable (it answers 503 Service Unavailable)" in err and "Traceback" not in err, err


def test_wandb_runs_report_as_their_folders_do_and_a_sweep_alone(tiny_data, tmp_path, capsys, monkeypatch):
    stand_in = WandbServer()
    try:
        for name, value in {**stand_in.environment(), "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("WANDB_PROJECT", PROJECT)
        write_runs(tiny_data, tmp_path / "out", sweep="sweep1")
        wandb.teardown()  # every run's last upload done, as at the end of their processes
        deadline = time.monotonic() + 60  # W&B's service may still be sending a run's end
        while any(run.exit_code is None for run in stand_in.runs.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {run.sweep for run in stand_in.runs.values()} == {"sweep1", ""}
        folders = run_report(capsys, tmp_path / "out", "--format", "csv")
        online = run_report(capsys, "--wandb", f"{ENTITY}/{PROJECT}", "--format", "csv")
        assert online[0] == folders[0] == 0 and online[2] == folders[2] == "", online[2]
        differ = [  # cell by cell, to say which (W&B keeps the same floats: no tolerance needed)
            (group, key, value, csv_rows(online[1])[group][key])
            for group, row in csv_rows(folders[1]).items()
            for key, value in row.items()
            if csv_rows(online[1]).get(group, {}).get(key) != value
        ]
        states = {r.name: (r.group, r.exit_code, r.tags) for r in stand_in.runs.values()}
        assert not differ and len(csv_rows(online[1])) == 3, (differ, states)
        codes = sorted(run.code for run in replicates.read_folders(tmp_path / "out")[0])
        assert codes == sorted(run.code for run in replicates.read_wandb(f"{ENTITY}/{PROJECT}"))  # W&B's config
        assert len(codes) == 7 and None not in codes
        code, out, _ = run_report(capsys, "--wandb", f"{ENTITY}/{PROJECT}", "--sweep", "sweep1", "--format", "csv")
        assert code == 0 and sorted(row["lr"] for row in csv_rows(out).values()) == sorted([HIGH, LOW])
        code, _, err = run_report(capsys, "--wandb", f"{ENTITY}/{PROJECT}", "--plot", tmp_path / "curves.png")
        assert code == 0 and (tmp_path / "curves.png").stat().st_size > 0, err  # curves from W&B's history
    finally:
        stand_in.close()
