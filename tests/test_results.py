"""The results store: append-only JSON Lines, readable after a crash, merged across files, locked per suite."""

from __future__ import annotations

import fcntl
import json
import threading

import pytest

from drbench.record import SCHEMA_VERSION, Record
from drbench.results import (
    ResultsStore,
    RunWriter,
    StoreLockedError,
    StoreWarning,
    load,
    read_records,
    resume_key,
)


def record(op: str = "conv", status: str = "ok", commit: str = "abc", threads: int = 1, **metrics) -> dict:
    return Record.model_validate({
        "schema": SCHEMA_VERSION,
        "suite": "s",
        "run_id": "r",
        "config": {"model": "shufflenetv2", "width": 0.5, "op": op},
        "config_hash": f"hash-{op}",
        "metric_settings": {"latency": {"budget_s": 1.0}},
        "status": status,
        "error": None if status == "ok" else "ValueError: boom",
        "traceback": None,
        "metrics": metrics or {"macs": {"value": 41_000_000, "executed_flops": 82_000_000},
                               "latency": {"value": 0.01, "samples": [0.01, 0.011], "noisy": False,
                                           "train": {"median_s": 0.03}}},
        "env": {"git_commit": commit, "machine": "m", "threads": threads, "hostname": "m"},
        "started": "2026-01-01T00:00:00+00:00",
        "duration_s": 1.5,
    }).to_dict()


def test_records_are_appended_one_line_each_and_read_back(tmp_path):
    path = tmp_path / "run.jsonl"
    with RunWriter(path) as writer:
        writer.append(record("conv"))
        writer.append(record("drconv"))
        assert writer.count == 2
        # already on disk before the writer closes
        assert len(path.read_text().splitlines()) == 2
    assert [r["config"]["op"] for r in read_records(path)] == ["conv", "drconv"]


def test_a_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "run.jsonl"
    with RunWriter(path) as writer:
        writer.append(record("conv"))
    full = json.dumps(record("drconv"))
    with path.open("a") as handle:
        handle.write(full[: len(full) // 2])  # a writer killed mid-line
    with pytest.warns(StoreWarning, match=r"run.jsonl:2: skipped truncated last line"):
        records = read_records(path)
    assert [r["config"]["op"] for r in records] == ["conv"]


def test_an_unreadable_line_in_the_middle_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(record("conv")) + "\n{oops\n" + json.dumps(record("local")) + "\n[1, 2]\n")
    with pytest.warns(StoreWarning) as caught:
        records = read_records(path)
    assert [r["config"]["op"] for r in records] == ["conv", "local"]
    assert [str(w.message).split(": skipped")[0].rsplit(":", 1)[1] for w in caught] == ["2", "4"]


def test_load_flattens_records_and_merges_a_folder(tmp_path):
    store = ResultsStore(tmp_path / "s")
    with store.writer("run-1") as writer:
        writer.append(record("conv"))
    with store.writer("run-2") as writer:
        writer.append(record("drconv", status="error", metrics={}))
    (tmp_path / "s" / "notes.txt").write_text("not a results file")
    frame = load(tmp_path)
    assert list(frame["op"]) == ["conv", "drconv"]
    assert list(frame["status"]) == ["ok", "error"]
    row = frame.iloc[0]
    assert row["macs"] == 41_000_000 and row["macs.executed_flops"] == 82_000_000
    assert row["latency"] == 0.01 and row["latency.samples"] == [0.01, 0.011]
    assert row["latency.train"] == {"median_s": 0.03}
    assert row["env.threads"] == 1 and row["settings.latency.budget_s"] == 1.0
    assert frame.iloc[1]["error"] == "ValueError: boom"
    assert len(load(tmp_path / "s" / "run-1.jsonl")) == 1


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such results file or folder"):
        load(tmp_path / "nothing")


def test_completed_holds_only_successful_records(tmp_path):
    store = ResultsStore(tmp_path / "s")
    assert store.completed() == set()
    with store.writer() as writer:
        writer.append(record("conv"))
        writer.append(record("drconv", status="error"))
    assert store.completed() == {resume_key(record("conv"))}


def test_resume_key_separates_commit_machine_threads_and_settings():
    base = record()
    assert resume_key(base) == resume_key(record())
    assert resume_key(base) != resume_key(record(commit="def"))
    assert resume_key(base) != resume_key(record(threads=2))
    changed = record()
    changed["metric_settings"]["latency"]["budget_s"] = 2.0
    assert resume_key(base) != resume_key(changed)


def test_a_second_writer_of_the_same_suite_is_refused(tmp_path):
    store = ResultsStore(tmp_path / "s")
    with store.lock():
        with pytest.raises(StoreLockedError, match=r"is in use by drbench run \(pid \d+"):
            with ResultsStore(tmp_path / "s").lock():
                pass
    with store.lock():  # released
        pass



def test_a_refused_run_names_a_holder_that_has_not_written_its_name_yet(tmp_path):
    # the holder takes the lock, then writes its name: a run refused in between waits for the name
    (tmp_path / "s").mkdir()
    with (tmp_path / "s" / ".lock").open("a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        writer = threading.Timer(0.2, lambda: (holder.write("drbench run (pid 1 on elsewhere)"), holder.flush()))
        writer.start()
        with pytest.raises(StoreLockedError, match=r"in use by drbench run \(pid 1 on elsewhere\)"):
            with ResultsStore(tmp_path / "s").lock():
                pass
        writer.join()
    assert ResultsStore(tmp_path / "s").holder() is None


def test_a_released_lock_forgets_its_holder(tmp_path):
    store = ResultsStore(tmp_path / "s")
    with store.lock():
        pass
    assert (tmp_path / "s" / ".lock").read_text() == ""


SCHEMA_1_LINE = (
    '{"schema":1,"suite":"quick","run_id":"20261128T101500Z-vm-4242","config":{"model":"shufflenetv2","width":0.5,'
    '"op":"drconv","input_size":64,"placement":"default","small_input":false,"num_classes":null,"batch_size":1,'
    '"dtype":"float32","device":"cpu","regions":8},"config_hash":"5f2c0a9e7b1d3c4e","metric_settings":{"macs":'
    '{"by_layer":false},"latency":{"budget_s":1.0,"warmup":3,"min_blocks":5,"target_rel_iqr":0.05,"training":false}},'
    '"status":"ok","error":null,"traceback":null,"metrics":{"macs":{"value":41000000,"executed_flops":82000000,'
    '"unsupported_ops":{}},"latency":{"value":0.0101,"samples":[0.01,0.0101,0.0102],"batch_size":1,"warmup":3,'
    '"calls_per_block":4,"threads":1,"device":"cpu","median_s":0.0101,"iqr_s":0.0001,"min_s":0.01,"rel_iqr":0.0099,'
    '"noisy":false,"throughput":99.0}},"env":{"git_commit":"d644a780e04502ae9fab8618d29a883a50e88ebe",'
    '"git_dirty":false,"drbench_version":"0.1.0","torch_version":"2.13.0+cpu","cuda_version":null,"threads":1,'
    '"machine":"vm","hostname":"vm","device":"cpu","device_name":"Test CPU","region_conv_impl":"fast",'
    '"time":"2026-11-28T10:15:00+00:00"},"started":"2026-11-28T10:15:00+00:00","duration_s":2.5,'
    '"execution":[{"executor":"local"}]}\n'
)


def test_a_schema_1_record_written_before_the_typed_record_still_loads_unchanged(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(SCHEMA_1_LINE)
    (loaded,) = read_records(path)
    assert loaded == json.loads(SCHEMA_1_LINE)


def test_a_record_of_an_unknown_schema_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "new.jsonl"
    path.write_text(json.dumps({**json.loads(SCHEMA_1_LINE), "schema": 99}) + "\n" + SCHEMA_1_LINE)
    with pytest.warns(StoreWarning, match=r"new.jsonl:1: skipped unreadable line \(invalid record: schema: "):
        assert len(read_records(path)) == 1
