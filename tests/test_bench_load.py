"""Smoke test of the load benchmark (bench/load_test.py): a few clients for a few seconds
against the real app; the report has every field. No timing is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"clients", "seconds", "polls", "errors", "latency_median_s", "latency_p95_s",
          "latency_max_s", "steps_per_s_quiet", "steps_per_s_loaded", "speed_change_pct",
          "client_cpu_s_per_s", "app_cpu_s_per_s_quiet", "app_cpu_s_per_s_loaded", "cpus",
          "load_average"}


def test_three_clients_for_a_few_seconds_report_every_field(tmp_path):
    env = dict(os.environ, DANLU_BENCH_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "bench.load_test", "--clients", "3",
                           "--seconds", "4", "--baseline", "2", "--warmup", "0", "--no-write"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in reversed(done.stdout.splitlines()) if l.startswith("BENCH_JSON "))
    result = json.loads(line[len("BENCH_JSON "):])
    assert FIELDS <= set(result), FIELDS - set(result)
    assert result["clients"] == 3 and result["polls"] > 0 and result["errors"] == 0, result
    assert result["latency_median_s"] <= result["latency_p95_s"] <= result["latency_max_s"]
    assert result["steps_per_s_quiet"] > 0 and result["steps_per_s_loaded"] > 0


def test_the_report_section_replaces_only_its_own(tmp_path):
    from bench import load_test
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Training\n\nkept text\n\n## Preprocess throughput\n\n"
                    "also kept\n", encoding="utf-8")
    result = {"clients": 20, "seconds": 60.0, "baseline_seconds": 30.0, "polls": 1100,
              "errors": 0, "error_examples": [], "polls_per_client_per_s": 0.9,
              "latency_median_s": 0.05, "latency_p95_s": 0.2, "latency_max_s": 0.9,
              "steps_per_s_quiet": 10.0, "steps_per_s_before": 9.8, "steps_per_s_after": 10.2,
              "steps_per_s_loaded": 9.5, "speed_change_pct": -5.0, "client_cpu_s_per_s": 0.3,
              "app_cpu_s_per_s_quiet": 1.0, "app_cpu_s_per_s_loaded": 1.4,
              "cpus": 2, "load_average": [1.0, 1.0, 1.0], "when": "today"}
    load_test.write(result, path)
    load_test.write({**result, "polls": 1234}, path)  # again: replaced, not added twice
    text = path.read_text(encoding="utf-8")
    assert "kept text" in text and "also kept" in text
    assert text.count("### Load: 20 clients") == 1 and "1234 / 0" in text and "1100" not in text
    assert "(**-5 %**)" in text and "0.05 s / 0.2 s / 0.9 s" in text
    assert "**met**" in text and "oversubscribed" not in text
