"""`trainer report` on a log.jsonl whose last line was cut off by a crash or a full disk: the
line is skipped with a note; a bad line elsewhere is still an error."""

from __future__ import annotations

import json

import pytest

from trainer.cli import main


def record(step: int) -> str:
    return json.dumps({"step": step, "total_steps": 8, "loss": 1.0 / step, "lr": 1e-3, "samples_per_s": 100.0,
                       "data_wait": 0.1, "peak_mem_bytes": 2**20, "elapsed_s": step, "eta_s": 8 - step})


def test_report_skips_a_torn_last_line_with_a_note(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    torn = record(3)[:40]  # the writer died half way through the line
    (run / "log.jsonl").write_text(record(1) + "\n" + record(2) + "\n" + torn)
    main(["report", str(run)])  # returns: status 0
    captured = capsys.readouterr()
    assert f"note: {run / 'log.jsonl'}:3: the last line is cut off" in captured.err
    md = (run / "report" / "report.md").read_text()
    assert "2 of 8 steps logged" in md


def test_report_refuses_a_bad_line_in_the_middle(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(record(1) + "\n" + record(2)[:30] + "\n" + record(3) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["report", str(run)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {run / 'log.jsonl'}:2: not a JSON line"
