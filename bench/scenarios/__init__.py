"""The scenarios, in the order they run. Each is written once for every peer."""

from __future__ import annotations

from types import ModuleType

from bench.scenarios import control, fleet, idle, logs, restart, scale, schedule, stop

SCENARIOS: dict[str, ModuleType] = {
    module.TITLE: module
    for module in (idle, fleet, logs, restart, stop, schedule, control, scale)
}
