"""The machinery around an experiment (main.py), one job a module; none of it knows the data, the model
or a metric's name (the metrics and tags are utils.py's tables).

What main.py uses:
- options: the command line. `parser(description, add_hyperparameters)`, the validators (`Number`,
  `Boolean`, `Widths`), `parser_of(script)` for tools that must not load torch.
- watch: the guard. `begin(script, parser)` is what `python main.py` does before torch loads.
- session: one run. `Experiment(...)` names main.py's parts; `main(experiment, argv, link)` runs them
  and returns the exit status; `exit(status)` ends the process.
- batches: `Data` (what load_data returns), `hold_out(dataset, size)`.
- steps: `Steps`, the per-batch bookkeeping a training epoch hands each step to (`keep`).
- devices: `autocast(precision, device)`.
- errors: `StartError` (the run cannot start: its message says what to do), `described(e)`.

Behind them: runs (the W&B run, the run folder, results.json, resume), checkpoints, metrics, distributed
(torchrun's ranks as one run),
wandb_start (W&B's start and a time limit on its calls), files (atomic writes), output (stdout and
stderr that outlive their reader). For the tools beside
main.py: replicates (runs read back from their folders or W&B, and the statistics over a group's seeds,
for report.py and local_sweep.py). Nothing imported here:
the guard loads only what it needs, and never torch.
"""
