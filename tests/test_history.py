"""drbench.history: series in git order, step changes, and the plot, on a synthetic multi-commit store."""

from __future__ import annotations

import random

import pytest
from comparison_records import CONV, DRCONV, git_repo, make_record, timings, write_store

from drbench.metric_registry import quantity
from drbench.stats import Verdict
from drbench.history import GIT_ORDER, HistoryPoint, build_history, find_steps, load_history, plot_history


def _day(index: int) -> str:
    return f"2025-01-{index + 1:02d}T00:00:00+00:00"


@pytest.fixture()
def store(tmp_path):
    """Six commits. conv gets 30% slower at commit 3 and stays there; drconv only jitters (3% noise).
    The records are written newest first, and their times run backwards, so only git knows the order."""
    commits = git_repo(tmp_path / "repo", 6)
    rng = random.Random(0)
    records = []
    for index, commit in reversed(list(enumerate(commits))):
        when = _day(10 - index)
        records.append(make_record(CONV, latency=timings(rng, 0.010 if index < 3 else 0.013, 20), macs=100,
                                   commit=commit, started=when))
        records.append(make_record(DRCONV, latency=timings(rng, 0.020, 20), macs=120 + (index >= 4),
                                   commit=commit, started=when))
    write_store(tmp_path / "results" / "synthetic" / "run.jsonl", records)
    return tmp_path, commits


def test_a_step_is_found_at_the_commit_that_made_it_and_nowhere_else(store):
    root, commits = store
    history = load_history(root / "results", "latency", repo=root / "repo")
    assert history.order == GIT_ORDER
    conv, drconv = sorted(history.cells, key=lambda c: c.label)
    assert [p.commit for p in conv.points] == commits
    (step,) = conv.steps
    assert step.index == 3 and step.commit == commits[3][:7]
    assert step.decision.verdict is Verdict.REGRESSED and step.decision.ratio == pytest.approx(1.3, rel=0.05)
    assert step.before == pytest.approx(0.010, rel=0.05) and step.after == pytest.approx(0.013, rel=0.05)
    assert drconv.steps == ()


def test_deterministic_metrics_step_on_any_change_and_cells_can_be_filtered(store):
    root, commits = store
    history = load_history(root / "results", "macs", cell="op=drconv", repo=root / "repo")
    (cell,) = history.cells
    assert [(s.commit, s.before, s.after) for s in cell.steps] == [(commits[4][:7], 120, 121)]


def test_without_git_the_points_follow_record_time(store):
    root, commits = store
    history = load_history(root / "results", "latency", cell="op=conv", repo=root)  # root: not a repository
    assert history.order.startswith("time of first record")
    assert [p.commit for p in history.cells[0].points] == commits[::-1]


def _points(levels: list[float], seed: int = 0) -> list[HistoryPoint]:
    rng = random.Random(seed)
    return [HistoryPoint(f"{i:040x}", f"c{i}", _day(i), tuple(timings(rng, level, 15))) for i, level in
            enumerate(levels)]


def test_a_one_commit_spike_is_two_steps_and_a_flat_series_none():
    steps = find_steps(_points([1.0, 1.0, 1.5, 1.0, 1.0]), quantity("latency"), 0.10)
    assert [(s.index, s.decision.verdict) for s in steps] == [(2, Verdict.REGRESSED), (3, Verdict.IMPROVED)]
    assert find_steps(_points([1.0] * 8, seed=1), quantity("latency"), 0.10) == []


def test_a_slow_drift_adds_up_to_a_step():
    # 4% per commit: no neighbour differs by 10%, the first and last commits by 27%.
    steps = find_steps(_points([1.0, 1.04, 1.08, 1.12, 1.17, 1.22, 1.27], seed=2), quantity("latency"), 0.10)
    assert steps and all(s.decision.verdict is Verdict.REGRESSED for s in steps)


def test_the_plot_is_written(store):
    root, _ = store
    history = load_history(root / "results", "latency", repo=root / "repo")
    out = plot_history(history, root / "plots" / "history.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_nothing_selected_is_an_error(store):
    root, _ = store
    with pytest.raises(ValueError, match="no successful records with metric 'accuracy'"):
        build_history([], "accuracy")
    with pytest.raises(ValueError, match="suite=other"):
        load_history(root / "results", "latency", suite="other")


def test_thread_counts_are_separate_series():
    rng = random.Random(3)
    records = [make_record(CONV, latency=timings(rng, 0.010 * threads, 20), commit=f"{index:040x}", threads=threads,
                           started=_day(index)) for index in range(3) for threads in (1, 2)]
    history = build_history(records, "latency")
    assert sorted(cell.label.split()[-2] for cell in history.cells) == ["threads=1", "threads=2"]
    assert history.steps == []
