"""``jstab demo --quick``, end to end, as a user runs it."""

import fcntl
import json
import math
import subprocess
import sys

import pytest

from jstab import demo


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, worker_id):
    """The output folder and stdout of one ``jstab demo --quick`` run.

    One run for the whole session, whichever pytest-xdist workers draw these
    tests: the first to take the lock runs the demo into the session's
    shared temporary folder, the others wait and read its output. (xdist's
    ``--dist loadgroup`` would keep the tests on one worker, but with this
    project's pytest it no longer groups anything: pytest-xdist issue 1386.)
    """
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # the session's folder, above each worker's
    out, stdout = shared / "demo-quick", shared / "demo-quick.stdout"
    with open(shared / "demo-quick.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stdout.exists():
            result = subprocess.run(
                [sys.executable, "-m", "jstab", "demo", "--quick", "--out", str(out)],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            assert "Warning" not in result.stderr, result.stderr[-3000:]
            stdout.write_text(result.stdout)
    return out, stdout.read_text()


def _rows(out) -> dict[str, dict]:
    record = json.loads((out / "results.json").read_text())
    return {row["name"]: row for row in record["results"]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_quick_run_measures_every_quick_configuration(quick_run):
    out, stdout = quick_run
    rows = _rows(out)
    assert list(rows) == [c.name for c in demo.CONFIGS if c.quick]
    record = json.loads((out / "results.json").read_text())
    assert record["budget"] == vars(demo.QUICK)
    for row in rows.values():
        assert len(row["metric"]) == demo.QUICK.seeds
        assert row["seconds"] > 0


def test_quick_run_prints_and_writes_the_table_and_the_plots(quick_run):
    out, stdout = quick_run
    table = (out / "table.md").read_text()
    assert table.strip() in stdout
    for name in _rows(out):
        assert f"| {name} " in table
    for png in (
        "grad_norm_at_init.png",
        "activation_std_at_init.png",
        "training_curves.png",
    ):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vanishing_configuration_is_diagnosed_as_vanishing(quick_run):
    rows = _rows(quick_run[0])
    vanishing = rows["sigmoid + small N(0, 0.01²)"]
    assert vanishing["diagnosis"] == "vanishing"
    assert vanishing["ratio"] < 1e-3
    assert rows["ReLU + He, SGD 0.5 + global-norm clip"]["diagnosis"] == "ok"


def test_clipped_configurations_end_finite_and_record_their_clips(quick_run):
    clipped = [
        row for row in _rows(quick_run[0]).values() if row["clipped"] is not None
    ]
    assert clipped, "no quick row clips"
    for row in clipped:
        assert all(math.isfinite(v) for v in row["train_loss"] + row["metric"]), row
        assert all(0 < v <= demo.QUICK.steps for v in row["clipped"]), row


def test_he_beats_the_sigmoid_small_init_baseline_in_accuracy(quick_run):
    rows = _rows(quick_run[0])
    baseline = _mean(rows["sigmoid + small N(0, 0.01²)"]["metric"])
    remedy = rows["ReLU + He, SGD 0.5 + global-norm clip"]
    assert _mean(remedy["metric"]) > baseline + 0.2


@pytest.mark.parametrize("argument", ["--steps=0", "--seeds=-1", "--steps=x"])
def test_demo_rejects_a_bad_budget_naming_it(argument):
    result = subprocess.run(
        [sys.executable, "-m", "jstab", "demo", argument],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert argument.split("=")[0] in result.stderr


def test_quick_run_prints_each_table_of_its_rows_and_only_those(quick_run):
    out, stdout = quick_run
    rows = _rows(out)
    tables = {c.table for c in demo.CONFIGS if c.quick}
    assert {row["table"] for row in rows.values()} == tables
    assert {"digits", "precision"} <= tables
    for part, title in demo.report.PARTS.items():
        assert (title in stdout) == (part in tables), part
    assert demo.report.NOTES["digits"] in stdout


def test_sgd_diverges_on_relu_he_and_the_global_norm_clip_rescues_it(quick_run):
    rows = _rows(quick_run[0])
    plain = rows["ReLU + He, SGD 0.5"]
    clipped = rows["ReLU + He, SGD 0.5 + global-norm clip"]
    assert clipped["baseline"] == "ReLU + He, SGD 0.5"
    assert all(v < 0.2 for v in plain["metric"])
    assert all(math.isfinite(v) for v in clipped["train_loss"])
    assert all(v > 0.6 for v in clipped["metric"])


def test_quick_run_prints_and_writes_part_g(quick_run):
    out, stdout = quick_run
    table = (out / "depth.md").read_text()
    assert table.startswith(demo.depth.TITLE)
    assert table.strip() in stdout
    assert stdout.index(demo.depth.TITLE) > stdout.index(demo.report.PARTS["digits"])
    record = json.loads((out / "depth.json").read_text())
    assert record["budget"]["depths"] == list(demo.depth.QUICK.depths)
    assert len(record["rows"]) == len(demo.depth.QUICK.depths) * len(
        demo.depth.QUICK.variants
    )
    for row in record["rows"]:
        numbers = row["stream_std"] + row["ratio"] + row["train_loss"]
        assert all(math.isfinite(v) for v in numbers + row["accuracy"]), row
    assert (out / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_depth_only_runs_part_g_alone(tmp_path, monkeypatch, capsys):
    from jstab import cli

    tiny = demo.depth.Budget(depths=(2,), steps=3, seeds=1, width=8, batch=8)
    monkeypatch.setattr(demo.depth, "QUICK", tiny)
    argv = ["demo", "--depth-only", "--quick", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(demo.depth.TITLE)
    assert demo.report.PARTS["digits"] not in stdout
    assert not (tmp_path / "results.json").exists()
    record = json.loads((tmp_path / "depth.json").read_text())
    assert record["budget"]["depths"] == [2] and record["budget"]["steps"] == 3
    assert len(record["rows"]) == len(demo.depth.VARIANTS)


def test_lm_only_runs_part_f_alone(tmp_path, monkeypatch, capsys):
    from jstab import cli

    tiny = demo.lm.Budget(
        settings=(demo.lm.Setting("stable", 3e-3, ("none",)),),
        steps=4,
        seeds=1,
        layers=1,
        width=8,
        heads=2,
        context=8,
        batch=2,
        warmup=2,
        eval_windows=2,
    )
    monkeypatch.setattr(demo.lm, "QUICK", tiny)
    argv = ["demo", "--lm-only", "--quick", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(demo.lm.TITLE)
    assert demo.report.PARTS["digits"] not in stdout
    assert demo.depth.TITLE not in stdout
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / "depth.json").exists()
    record = json.loads((tmp_path / "lm.json").read_text())
    assert record["budget"]["steps"] == 4 and len(record["rows"]) == 1
    assert all(math.isfinite(v) for v in record["rows"][0]["valid_loss"])


def test_quick_run_prints_and_writes_part_f(quick_run):
    out, stdout = quick_run
    table = (out / "lm.md").read_text()
    assert table.startswith(demo.lm.TITLE)
    assert table.strip() in stdout
    record = json.loads((out / "lm.json").read_text())
    assert record["budget"]["steps"] == demo.lm.QUICK.steps
    assert len(record["rows"]) == demo.lm.runs(demo.lm.QUICK)
    for row in record["rows"]:
        assert len(row["valid_loss"]) == demo.lm.QUICK.seeds
        assert all(math.isfinite(v) for v in row["valid_loss"] + row["loss"])
    assert (out / "lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
