"""Smoke test of the benchmark suite: every scenario at quick sizes, runvisor only.

Each scenario runs `bench/run.py --quick` in a child process against the
real `runvisor` CLI, so the suite breaks here, not months later, when the CLI,
the config format or the log layout changes. A scenario is skipped only
when the runvisor feature it needs is missing, with the reason the suite
records (for example, no `stop` command yet).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The suite lives in bench/ at the repository root, outside the package.
sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from bench.scenarios import SCENARIOS  # noqa: E402
from bench.scenarios.common import percentile  # noqa: E402
from bench.scenarios.logs import count_lost  # noqa: E402

# Metrics every quick run of a scenario must report.
EXPECTED = {
    "idle": {"cpu_s_alone", "rss_mib_alone", "cpu_s_children", "rss_mib_children"},
    "fleet": {"start_s", "running_s", "stop_s", "shutdown_s"},
    "logs": {
        f"{mode}_{metric}"
        for mode in ("block", "line")
        for metric in (
            "s",
            "lost",
            "garbled",
            "cpu_s",
            "peak_rss_mib",
            "rss_over_idle_mib",
        )
    },
    "restart": {"latency_ms_median", "latency_ms_max"},
    "stop": {"stop_s", "left_after_stop", "shutdown_s", "left_after_shutdown"},
    "schedule": {
        "late_ms_p50",
        "late_ms_p99",
        "late_ms_max",
        "floor_ms_p99",
        "over_floor_ms_p99",
        "duplicates",
        "misses",
    },
    "control": {
        "status_cli_s",
        "status_json_cli_s",
        "roundtrip_ms_p50",
        "roundtrip_ms_p99",
    },
    "scale": {"start_s", "rss_mib", "status_json_cli_s"},
}

# Seconds each quick scenario may take. The schedule scenario waits for the
# next minute boundary, which takes up to about 90 s.
TIMEOUTS = {"schedule": 200}
DEFAULT_TIMEOUT = 100


def test_every_scenario_is_smoke_tested() -> None:
    assert set(EXPECTED) == set(SCENARIOS)


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(
            name, marks=pytest.mark.timeout(TIMEOUTS.get(name, DEFAULT_TIMEOUT) + 20)
        )
        for name in SCENARIOS
    ],
)
def test_quick_scenario_runs(scenario: str, tmp_path: Path) -> None:
    timeout = TIMEOUTS.get(scenario, DEFAULT_TIMEOUT)
    command = [
        sys.executable,
        str(REPO / "bench" / "run.py"),
        "--quick",
        "--repeat=1",
        "--peers=runvisor",
        f"--scenario={scenario}",
        f"--out-dir={tmp_path}",
        "--fresh",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    results_file = tmp_path / "latest.json"
    assert results_file.exists(), done.stderr[-3000:]
    results = json.loads(results_file.read_text())
    entry = results["scenarios"][scenario]["peers"]["runvisor"]

    if entry.get("skipped"):
        pytest.skip(
            f"runvisor cannot run the {scenario} scenario yet: {entry['skipped']}"
        )
    assert entry["errors"] == [], done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(entry["metrics"]) == EXPECTED[scenario]
    assert (tmp_path / "RESULTS.md").read_text().startswith("# Benchmark results")


def test_count_lost_finds_missing_and_cut_lines(tmp_path: Path) -> None:
    pad = "x" * 90
    log = tmp_path / "run.log"
    log.write_text(
        f"2026-12-04T17:43:26.123Z out 00000000 {pad}\n"
        f"2026-12-04T17:43:26.123Z out 00000002 {pad[:40]}\n"
        f"00000003 {pad}\n"
    )

    lost, garbled = count_lost([log], 4)

    assert lost == 2
    assert garbled == 1


def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]

    assert percentile(values, 0.5) == pytest.approx(50.5, abs=0.1)
    assert percentile(values, 0.99) == pytest.approx(99.0, abs=0.1)
    assert percentile([7.0], 0.99) == 7.0


def _results(metrics: dict[str, dict[str, float]]) -> dict[str, object]:
    return {
        "peers": {name: {} for name in metrics},
        "scenarios": {
            "idle": {
                "peers": {
                    name: {"metrics": {k: {"median": v} for k, v in values.items()}}
                    for name, values in metrics.items()
                }
            }
        },
    }


def test_target_ratio_against_named_peer() -> None:
    target = report.Target("rss", "idle", "rss_mib_children", 1.3, "supervisord")
    results = _results(
        {
            "runvisor": {"rss_mib_children": 39.0},
            "supervisord": {"rss_mib_children": 25.0},
        }
    )

    outcome = report.evaluate(results, target)

    assert outcome["measured"] == pytest.approx(1.56)
    assert outcome["met"] is False


def test_target_against_best_peer_uses_lowest() -> None:
    target = report.Target("cpu", "idle", "cpu_s_alone", 0.5, "best")
    results = _results(
        {
            "runvisor": {"cpu_s_alone": 1.0},
            "circus": {"cpu_s_alone": 4.0},
            "pm2": {"cpu_s_alone": 2.0},
        }
    )

    outcome = report.evaluate(results, target)

    assert outcome["against"] == "pm2"
    assert outcome["met"] is True


def test_target_without_runvisor_is_not_met_or_missed() -> None:
    target = report.Target("rss", "idle", "rss_mib_children", 150, strict=True)

    outcome = report.evaluate(_results({"pm2": {"rss_mib_children": 60.0}}), target)

    assert outcome["met"] is None
