"""The benchmarks' command line (``python -m bmp_lightning.tools.bench what=...``) and their one timing helper."""

from __future__ import annotations

import time

import pytest

from bmp_lightning.tools import bench
from bmp_lightning.utils.timing import best_time


def test_best_time_is_the_fastest_timed_run():
    calls, delays = [], iter([0.0, 0.03, 0.01, 0.02])  # warm-up, then three timed runs

    def fn():
        calls.append(1)
        time.sleep(next(delays))

    sec = best_time(fn, repeats=3, warmup=1)
    assert len(calls) == 4 and 0.01 <= sec < 0.02


def test_bench_takes_key_value_arguments(monkeypatch):
    ran = []
    monkeypatch.setitem(bench.BENCHES, "det", lambda: ran.append("det"))
    bench.main(["what=det"])
    assert ran == ["det"]
    for bad in (["det"], ["what=gpu"], ["what=det", "x=1"], []):
        with pytest.raises(SystemExit):
            bench.main(bad)
