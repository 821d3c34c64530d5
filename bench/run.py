"""Run the benchmark scenarios for runvisor and its peers in one run.

    python bench/run.py [--scenario NAME ...] [--peers a,b] [--repeat N] [--quick]

Writes `results/latest.json` and `RESULTS.md` (see `--out-dir`, `--markdown`).
Entries of scenarios and peers that this run did not measure are kept from
the previous `latest.json` of the same size class (quick or full), with
their own date, so a single scenario can be re-run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.peers import PEERS
from bench.peers.base import BENCH_DIR, Peer, PeerMissing
from bench.peers.runvisor import Runvisor
from bench.scenarios import SCENARIOS

logger = logging.getLogger("bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="scenario to run; repeat the option for several (default: all)",
    )
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"comma-separated peers to run (default: {','.join(PEERS)})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="repetitions of each scenario (default: 3)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and short windows, seconds each",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=BENCH_DIR / "results",
        help="folder for latest.json (default: bench/results)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="results page to write (default: bench/RESULTS.md, or RESULTS.md "
        "inside --out-dir when that is given)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample every runvisor daemon with py-spy into DIR "
        "(summarize with bench/profile.py)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="only write the results page again from latest.json",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="do not keep entries from the previous latest.json",
    )
    args = parser.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(
            f"unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)}"
        )
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, not {args.repeat}")
    if args.markdown is None:
        default_out = BENCH_DIR / "results"
        args.markdown = (
            BENCH_DIR / "RESULTS.md"
            if args.out_dir.resolve() == default_out.resolve()
            else args.out_dir / "RESULTS.md"
        )
    return args


def _load_previous(path: Path, quick: bool) -> dict[str, Any]:
    try:
        previous = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return previous if previous.get("quick") == quick else {}


def _peer_info(peer_cls: type[Peer]) -> dict[str, Any]:
    try:
        return {
            "version": peer_cls.version(),
            "missing": None,
            "counted": peer_cls.counted,
        }
    except PeerMissing as e:
        return {"version": None, "missing": str(e), "counted": peer_cls.counted}


def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out_json = args.out_dir / "latest.json"
    results = {} if args.fresh else _load_previous(out_json, args.quick)
    results.setdefault("scenarios", {})
    results.setdefault("peers", {})
    results.update(
        run=run_id,
        date=run_id,
        quick=args.quick,
        repeat=args.repeat,
        machine=report.machine(),
    )
    for name in PEERS:
        if name in args.peers or name not in results["peers"]:
            results["peers"][name] = _peer_info(PEERS[name])
    # Keep the peers in the registry's order, runvisor first.
    results["peers"] = {name: results["peers"][name] for name in PEERS}

    scenarios = args.scenario or list(SCENARIOS)
    for title in scenarios:
        module = SCENARIOS[title]
        entries = results["scenarios"].setdefault(title, {"peers": {}})["peers"]
        results["scenarios"][title]["measures"] = module.MEASURES
        values: dict[str, dict[str, list[float]]] = {}
        errors: dict[str, list[str]] = {}
        runnable = []
        for name in args.peers:
            info = results["peers"][name]
            peer_cls = PEERS[name]
            reasons = [
                reason
                for feature in getattr(module, "FEATURES", ())
                if (reason := peer_cls.missing_feature(feature))
            ]
            if info["missing"]:
                reasons = [info["missing"]]
            if reasons:
                entries[name] = {
                    "run": run_id,
                    "date": run_id,
                    "skipped": "; ".join(reasons),
                }
            else:
                runnable.append(name)
        # Repetitions go round the peers, so a slow drift of the machine
        # spreads over every peer instead of favouring one.
        for repetition in range(args.repeat):
            for name in runnable:
                logger.info("%s: %s, repetition %d", title, name, repetition + 1)
                started = time.perf_counter()
                try:
                    metrics = module.run(PEERS[name], args.quick)
                except Exception as e:
                    # One failed scenario run is recorded, and the others go on.
                    logger.error(
                        "%s: %s failed:\n%s", title, name, traceback.format_exc()
                    )
                    errors.setdefault(name, []).append(f"{type(e).__name__}: {e}")
                    continue
                logger.info(
                    "%s: %s took %.1f s: %s",
                    title,
                    name,
                    time.perf_counter() - started,
                    ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                )
                for metric, value in metrics.items():
                    values.setdefault(name, {}).setdefault(metric, []).append(
                        float(value)
                    )
        for name in runnable:
            entries[name] = {
                "run": run_id,
                "date": run_id,
                "repeat": args.repeat,
                "version": results["peers"][name]["version"],
                "metrics": {
                    metric: report.summarize(series)
                    for metric, series in values.get(name, {}).items()
                },
                "errors": errors.get(name, []),
            }
    results["scenarios"] = {
        t: results["scenarios"][t] for t in SCENARIOS if t in results["scenarios"]
    }
    results["targets"] = [report.evaluate(results, target) for target in report.TARGETS]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out_json)
    docs = {t: m.MEASURES for t, m in SCENARIOS.items()}
    args.markdown.write_text(report.markdown(results, docs))
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    args = parse_args(argv)
    if args.render_only:
        results = json.loads((args.out_dir / "latest.json").read_text())
        docs = {t: m.MEASURES for t, m in SCENARIOS.items()}
        args.markdown.write_text(report.markdown(results, docs))
        logger.info("Wrote %s", args.markdown)
        return 0
    if args.profile is not None:
        Runvisor.profile_dir = args.profile.resolve()
    results = run(args)
    failed = [
        f"{title}/{peer}"
        for title in (args.scenario or list(SCENARIOS))
        for peer, entry in results["scenarios"][title]["peers"].items()
        if peer in args.peers and entry.get("errors")
    ]
    logger.info("Wrote %s and %s", args.out_dir / "latest.json", args.markdown)
    if failed:
        logger.error("These scenario runs had errors: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
