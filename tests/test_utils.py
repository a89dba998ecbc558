"""The pure parts of utils.py: validators, group names, pruning, detectors, baselines, files."""

import argparse
import json
import os
import re
import stat

import pytest
import torch
from torcheval.metrics.functional import multiclass_accuracy, multiclass_f1_score

import generate_readme_stub
import main
import utils
from boilerplate import files, options
from conftest import group_of

pytestmark = pytest.mark.every_python  # fast and pure: the subset .ci/run runs on each other Python


def parse(*args: str) -> dict:
    return vars(main.get_parser().parse_args(list(args)))


# ---- command line


def test_both_flag_forms_and_every_boolean_spelling():
    assert parse("--lr", "0.01")["lr"] == parse("--lr=0.01")["lr"] == 0.01
    for text, value in [("yes", True), ("No", False), ("True", True), ("FALSE", False), ("1", True), ("0", False)]:
        assert parse(f"--save={text}")["save"] is value


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "2.5"], "--epochs"),
        (["--batch_size", "-1"], "--batch_size"),
        (["--optimizer", "rmsprop"], "--optimizer"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "fast"], "--lr"),
        (["--momentum", "1"], "--momentum"),
        (["--momentum", "-0.1"], "--momentum"),
        (["--weight_decay", "-1"], "--weight_decay"),
        (["--grad_clipping", "-1"], "--grad_clipping"),
        (["--seed", "-1"], "--seed"),
        (["--val_size", "0"], "--val_size"),
        (["--seed", "one"], "--seed"),
        (["--save", "maybe"], "--save"),
        (["--abort_irrelevant", "2"], "--abort_irrelevant"),
        (["--verbose", "3"], "--verbose"),
        (["--epoch_timeout", "-1"], "--epoch_timeout"),
        (["--std_threshold", "-5"], "--std_threshold"),
        (["--unknown", "1"], "--unknown"),
        # accepted once, then a crash: the bounds torch and Python can take, no infinities, no abbreviations
        (["--seed", str(2**63)], "--seed"),
        (["--epochs", str(2**63)], "--epochs"),
        (["--lr", "inf"], "--lr"),
        (["--grad_clipping", "inf"], "--grad_clipping"),
        (["--hid", "32"], "--hid"),
        (["--epoch", "3"], "--epoch"),
        # W&B would refuse these only once the data had loaded: "entity/project" is the usual slip
        (["--wandb_project", "my-team/mnist"], "--wandb_project"),
        (["--wandb_project", "x" * 129], "--wandb_project"),
    ],
)
def test_bad_values_end_with_a_usage_error_naming_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main.get_parser().parse_args(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and flag in err and "Traceback" not in err


def test_paths_on_the_command_line_begin_at_the_home_folder_as_a_shell_would_have_it(monkeypatch, tmp_path):
    """W&B's agent and a sweep file pass `--output_path=~/runs` through no shell: it was a folder named ~
    in the current one. The runs from one file, however it was written, share a group."""
    monkeypatch.setenv("HOME", str(tmp_path))
    opts = parse("--output_path=~/runs", "--data_path", "~/data", "--init_from=~/best.pt")
    assert (opts["output_path"], opts["data_path"]) == (str(tmp_path / "runs"), str(tmp_path / "data"))
    names = options.hyperparameter_names(main.get_parser())
    same = parse(f"--init_from={tmp_path / 'best.pt'}")
    assert utils.generate_name(opts, names) == utils.generate_name(same, names)


PROJECT_NAMES = ["mnist", "my-team_mnist.v2", "team/mnist", "a\\b", "#1", "why?", "100%", "a:b", "x" * 128, "x" * 129]


@pytest.mark.parametrize("name", [*PROJECT_NAMES, "ünï côdé", " spaced ", "a@b!c(d)[e]"])
def test_the_command_line_refuses_a_project_name_exactly_when_wandb_does(name):
    """--wandb_project is checked by W&B's rule as the command line is read, without W&B (options.ProjectName);
    this holds the copy to W&B's own validator, so that a W&B release that changes its rule shows here."""
    import wandb

    try:
        wandb.Settings(project=name)
        wandb_takes = True
    except wandb.errors.UsageError:
        wandb_takes = False
    try:
        options.ProjectName()(name)
        we_take = True
    except argparse.ArgumentTypeError:
        we_take = False
    assert we_take == wandb_takes


def test_the_largest_values_the_parser_allows_are_taken():
    opts = vars(main.get_parser().parse_args(["--seed", str(2**63 - 1), "--epochs", str(2**63 - 1)]))
    assert opts["seed"] == opts["epochs"] == 2**63 - 1


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main.get_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for action in main.get_parser()._actions[1:]:
        assert action.option_strings[0] in out
    assert "(default: 0.001)" in out and "(default: adam)" in out


# ---- group names


def test_group_name_ignores_seed_and_housekeeping_and_flag_order():
    name = group_of(parse("--lr", "0.001", "--optimizer", "sgd"))
    assert name == group_of(
        parse(
            "--optimizer=sgd",
            "--lr=1e-3",
            "--seed",
            "7",
            "--save",
            "yes",
            "--verbose",
            "0",
            "--std_threshold",
            "3",
            "--data_path",
            "x",
        )
    )
    assert name != group_of(parse("--lr", "0.002", "--optimizer", "sgd"))


def test_a_hyperparameter_added_to_the_parser_joins_the_group_name(monkeypatch):
    original = main.get_parser

    def with_a_new_flag():
        parser = original()
        group = options.option_groups(parser)[options.HYPERPARAMETERS].group
        group.add_argument("--test_only_share", type=options.Number(float, min=0), default=0.0)  # no fork's name
        return parser

    monkeypatch.setattr(main, "get_parser", with_a_new_flag)
    assert "test_only_share" in options.hyperparameter_names(main.get_parser())
    plain = vars(with_a_new_flag().parse_args([]))
    smooth = vars(with_a_new_flag().parse_args(["--test_only_share", "0.1"]))
    assert group_of(plain) != group_of(smooth)


def test_random_seed_is_drawn_and_a_given_one_kept():
    assert options.resolve_seed(parse("--seed", "5")["seed"]) == 5
    drawn = options.resolve_seed(parse("--seed", "random")["seed"])
    assert isinstance(drawn, int) and 0 <= drawn < 2**31


# ---- pruning


def test_prune_flags_momentum_with_adam_only():
    assert utils.prune_hyperparameters(parse("--optimizer", "adam", "--momentum", "0.9"), main.get_parser())
    assert utils.prune_hyperparameters(parse("--optimizer", "sgd", "--momentum", "0.9"), main.get_parser()) == []
    assert utils.prune_hyperparameters(parse(), main.get_parser()) == []


# ---- detectors


OPTS = parse()


def test_gradient_tags():
    assert utils.gradient_tags(0.1, 10.0, 1.0, OPTS) == []
    assert utils.gradient_tags(1e-6, 10.0, 1.0, OPTS) == ["Vanishing gradient"]
    assert utils.gradient_tags(0.1, 1e8, 1.0, OPTS) == ["Exploding gradient"]
    assert utils.gradient_tags(0.1, 10.0, 201.0, OPTS) == ["High StdDev"]


def test_nonfinite_step_names_the_first_bad_batch():
    assert utils.nonfinite_step([1.0, 2.0], [1.0, 1.0]) is None
    assert utils.nonfinite_step([1.0, float("nan"), float("inf")], [1.0] * 3) == (1, "NaN loss")
    assert utils.nonfinite_step([1.0, float("inf"), float("nan")], [1.0] * 3) == (1, "Inf loss")
    assert utils.nonfinite_step([1.0, 1.0], [1.0, float("inf")]) == (1, "NaN gradient")
    assert utils.nonfinite_step([float("nan")], [float("nan")]) == (0, "NaN loss")
    assert utils.nonfinite_step([1.0, 1.0, 1.0], [None, float("nan"), None]) == (1, "NaN gradient")  # --accumulate
    assert utils.nonfinite_step([1.0, float("inf")], [None, None]) == (1, "Inf loss")


def test_overfitting_and_guessing_tags():
    row = {"gap/accuracy": 0.6, "gap/f1": 0.2}
    assert utils.overfitting_tags(row, 0.5, utils.OVERFITTING_LEARNING) == ["Overfitting accuracy (learning)"]
    assert utils.overfitting_tags(row, 0.5, utils.OVERFITTING_END) == ["Overfitting accuracy (end)"]
    row = {"val/accuracy": 0.15, "val/f1": 0.9, "val/random_accuracy": 0.1, "val/random_f1": 0.1}
    assert utils.guessing_tags(row, "random", 0.1, utils.RANDOM_GUESSING) == ["Random guessing accuracy (val)"]


def test_baselines_agree_with_torcheval():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train_counts = [10, 40, 5]  # the training set's most frequent class is 1
    counts = torch.bincount(labels).tolist()
    constant = torch.full_like(labels, 1)
    assert utils.most_probable_accuracy(train_counts, counts) == pytest.approx(
        multiclass_accuracy(constant, labels).item()
    )
    assert utils.most_probable_f1(train_counts, counts) == pytest.approx(
        multiclass_f1_score(constant, labels, num_classes=3, average="macro").item()
    )
    # Uniform guessing, made exact: every sample of every class predicted as each class in turn.
    every = torch.arange(3).repeat(len(labels))
    repeated = labels.repeat_interleave(3)
    assert utils.random_accuracy(counts) == pytest.approx(multiclass_accuracy(every, repeated).item())
    assert utils.random_f1(counts) == pytest.approx(
        multiclass_f1_score(every, repeated, num_classes=3, average="macro").item()
    )


def test_failed_and_tag_bookkeeping():
    tags = []
    utils.add_tags(tags, ["Vanishing gradient", "Vanishing gradient"])
    utils.add_tags(tags, ["Vanishing gradient", "NaN loss"])
    assert tags == ["Vanishing gradient", "NaN loss"]
    assert utils.failed(tags) and not utils.failed(["Success", "Overfitting f1 (end)"])
    assert utils.resumable(["Vanishing gradient", "Crashed"]) and not utils.resumable(tags)
    assert (
        utils.RESUMABLE_TAGS
        == {"User abort", "Hangup", "Timeout", "Preempted", "Stopped", "Save failed", "W&B lost", "Crashed"}
        <= utils.ERROR_TAGS
    )
    assert {t.template for t in utils.TAGS if t.error} == {
        "Irrelevant hyperparameters",
        "User abort",
        "Hangup",
        "Timeout",
        "NaN loss",
        "Inf loss",
        "NaN gradient",
        "Preempted",
        "Stopped",
        "Save failed",
        "Exception",
        "W&B lost",
        "Crashed",
    }


def test_a_tag_longer_than_wandb_keeps_is_refused_as_the_table_is_built():
    long = utils.Tag("Most probable guessing after a very long and winding explanation {metric} ({split})", False, "")
    with pytest.raises(ValueError, match="longer than W&B's 64 characters: Most probable guessing after"):
        utils.check_tag_lengths((*utils.TAGS, long))
    utils.check_tag_lengths(utils.TAGS)


def test_the_documents_tables_are_the_code_tables():
    marked = []
    for path in generate_readme_stub.default_tables_files(utils.HERE):
        text = path.read_text()
        current, unknown = generate_readme_stub.rewrite_tables(text, main.get_parser())
        assert not unknown and current == text, f"stale tables in {path}: `python generate_readme_stub.py --tables`"
        marked += generate_readme_stub.MARK.findall(text)
    assert sorted(marked) == ["metrics", "tags", "thresholds"]


def test_the_readme_is_short_and_its_links_lead_somewhere():
    """The README is for the person who forks (200 lines at most); the rest is in docs/, linked."""
    readme = (utils.HERE / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for path in [utils.HERE / "README.md", *(utils.HERE / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name} links to {target}, which is not there"


# ---- files


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    files.write_json(path, {"status": "running", "loss": float("nan")})
    assert json.loads(path.read_text()) == {"status": "running", "loss": "NaN"}

    def broken(f):
        f.write(b'{"half":')
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.atomic_write(path, broken)
    assert json.loads(path.read_text())["status"] == "running"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    """A new file's from the umask (mkstemp alone gives 0600: a lab's shared outputs folder would hide each
    model and results.json from the rest of the team); a rewritten file keeps its own."""
    previous = os.umask(0o027)
    try:
        assert files.umask() == 0o027
        files.write_json(tmp_path / "new.json", {})
        kept = tmp_path / "kept.md"
        kept.write_text("old")
        kept.chmod(0o604)
        files.atomic_write(kept, lambda f: f.write(b"new"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640
    assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and kept.read_text() == "new"


def test_validators_describe_themselves_through_public_attributes():
    assert options.Number(int, min=1).describe() == "int >= 1"
    assert options.Number(float, min=0, max=1, max_open=True).describe() == "float >= 0 and < 1"
    assert options.Boolean().kind is bool and options.Widths().kind is tuple
    with pytest.raises(argparse.ArgumentTypeError):
        options.Boolean()("maybe")


def test_ci_runs_the_readme_test_command_and_installs_the_same_way_on_every_python():
    install = (
        "pip install -r requirements.txt -r requirements-tools.txt && pip install --no-deps -r requirements-sweeps.txt"
    )
    command = f"{install} && ruff check . && ruff format --check . && python -m pytest"  # lint first
    assert f"    {command}\n" in (utils.HERE / "README.md").read_text()
    assert f"\n{command}\n" in (utils.HERE / ".ci" / "run").read_text()
    assert f"\nINSTALL='{install}'\n" in (utils.HERE / ".ci" / "every-python").read_text()


def test_the_parser_keeps_each_groups_options_in_order_with_public_argparse_alone():
    parser = options.Parser()
    group = parser.add_argument_group("mine", "what it is for")
    first = group.add_argument("--alpha", type=float, default=1.0)
    second = group.add_argument("--beta", type=int, default=2)
    loose = parser.add_argument("--gamma")  # straight on the parser: argparse's "options" group
    assert parser.groups["mine"].actions == [first, second] and parser.groups["mine"].description == "what it is for"
    assert parser.groups["options"].actions == [loose]  # --help is left out
    assert vars(parser.parse_args(["--beta", "3"])) == {"alpha": 1.0, "beta": 3, "gamma": None}
    assert list(options.option_groups(main.get_parser())) == [
        "positional arguments",
        "options",
        options.HYPERPARAMETERS,
        "experiment",
        "output",
        options.THRESHOLDS,
    ]
