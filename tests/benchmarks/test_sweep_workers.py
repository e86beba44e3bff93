"""benchmarks/sweep.py's sweep driver: the protocol's order with one worker, its dependencies with several."""

import threading
import time

import pytest
from benchmark_scripts import load_benchmark

GRIDS = {"a": [1e-3, 3e-3, 1e-2], "b": [1e-4, 3e-4, 1e-3], "c": [1e-2, 3e-2, 1e-1]}
# Validation error by (method, lr): a's best is inside its grid, b's at the high edge (one extension, 3e-3,
# is worse), c's at the low edge twice (two extensions, then the best is inside).
ERRORS = {"a": {1e-3: 0.5, 3e-3: 0.2, 1e-2: 0.4}, "b": {1e-4: 0.6, 3e-4: 0.5, 1e-3: 0.3, 3e-3: 0.4},
          "c": {1e-2: 0.3, 3e-2: 0.5, 1e-1: 0.6, 3e-3: 0.2, 9e-4: 0.25}}


@pytest.fixture(scope="module")
def sweep():
    return load_benchmark("sweep")


class Recorder:
    """A fake ``run``: records start and end order, and optionally sleeps so that runs overlap."""

    def __init__(self, pause: float = 0.0):
        self.pause, self.events, self.lock = pause, [], threading.Lock()

    def __call__(self, method, lr, seed):
        with self.lock:
            self.events.append(("start", method, lr, seed))
        time.sleep(self.pause)
        with self.lock:
            self.events.append(("end", method, lr, seed))
        return {"method": method, "lr": lr, "seed": seed, "error": ERRORS[method][lr] + 0.01 * seed}

    def starts(self):
        return [event[1:] for event in self.events if event[0] == "start"]


def score(result):
    return result["error"]


def test_one_worker_runs_grids_then_extensions_then_seeds(sweep):
    run = Recorder()
    chosen = sweep.sweep(GRIDS, [0, 1, 2], run, score, extend=2, workers=1)
    assert chosen == {"a": 3e-3, "b": 1e-3, "c": 3e-3}
    grids = [(m, lr, 0) for m, grid in GRIDS.items() for lr in grid]
    extensions = [("b", 3e-3, 0), ("c", 3e-3, 0), ("c", 9e-4, 0)]
    seeds = [(m, chosen[m], s) for m in GRIDS for s in (1, 2)]
    assert run.starts() == grids + extensions + seeds


def test_two_workers_keep_each_methods_choice_before_its_seeds(sweep):
    run = Recorder(pause=0.02)
    chosen = sweep.sweep(GRIDS, [0, 1, 2], run, score, extend=2, workers=2)
    assert chosen == sweep.sweep(GRIDS, [0, 1, 2], Recorder(), score, extend=2, workers=1)
    assert sorted(run.starts()) == sorted(Recorder.starts(_sequential(sweep)))
    for method in GRIDS:
        last_first_seed_end = max(i for i, e in enumerate(run.events) if e[0] == "end" and e[1] == method and e[3] == 0)
        first_other_seed = min(i for i, e in enumerate(run.events) if e[0] == "start" and e[1] == method and e[3] > 0)
        assert last_first_seed_end < first_other_seed
    running, most = 0, 0
    for event in run.events:
        running += 1 if event[0] == "start" else -1
        most = max(most, running)
    assert most == 2  # runs overlapped, never more than the workers


def _sequential(sweep):
    run = Recorder()
    sweep.sweep(GRIDS, [0, 1, 2], run, score, extend=2, workers=1)
    return run


def test_an_unreadable_run_file_is_named_and_left_out(sweep, tmp_path, capsys):
    sweep.write_json(tmp_path / "a_lr1e-3_seed0.json", {"method": "a", "lr": 1e-3, "seed": 0})
    (tmp_path / "a_lr3e-3_seed0.json").write_text('{"method": "a", "lr": 0.0')  # cut short by an outside edit
    runs = sweep.load_runs(tmp_path, ["a"])
    assert [run["lr"] for run in runs] == [1e-3]
    assert "a_lr3e-3_seed0.json is not valid JSON" in capsys.readouterr().err


def test_report_only_without_runs_stops_and_says_how_to_get_them(sweep, tmp_path):
    from types import SimpleNamespace

    args = SimpleNamespace(worker=None, threads=1, runs=tmp_path / "missing", report_only=True, methods=["a"])

    def write_report(*_):
        raise AssertionError("no report from zero runs")

    with pytest.raises(SystemExit, match="no finished runs of a in .*missing.*Run the sweep first"):
        sweep.sweep_main("script.py", [], args, GRIDS, None, None, score, write_report, str)
