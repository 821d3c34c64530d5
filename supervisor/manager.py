"""All projects of the daemon: one runner task and cancel scope each.

The manager starts a `ProjectRunner` per configured project, routes
requests (trigger, start, stop, restart, status) to them by name, and
applies a reload as a diff: new projects start, removed ones stop, changed
ones restart, and unchanged ones are not touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from supervisor.config import Config, ConfigDiff, ProjectConfig, diff_configs
from supervisor.errors import RunvisorError, UnknownProject
from supervisor.model import ProjectState, ProjectStatus, TriggerMode
from supervisor.runner import ProjectRunner, RuntimeContext, TriggerResult

logger = logging.getLogger(__name__)


@dataclass
class _Hosted:
    runner: ProjectRunner
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class Manager:
    def __init__(self, config: Config, context: RuntimeContext) -> None:
        self.config = config
        self.context = context
        self._projects: dict[str, _Hosted] = {}
        self._nursery: trio.Nursery | None = None

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every project until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for project in self.config.projects.values():
                await self._start_project(project, start=True)
            task_status.started()
            await trio.sleep_forever()

    # -- requests by name ---------------------------------------------------

    def runner(self, name: str) -> ProjectRunner:
        hosted = self._projects.get(name)
        if hosted is None:
            raise UnknownProject(name)
        return hosted.runner

    @property
    def names(self) -> list[str]:
        return list(self._projects)

    def status(self, name: str | None = None) -> list[ProjectStatus]:
        if name is not None:
            return [self.runner(name).status()]
        return [hosted.runner.status() for hosted in self._projects.values()]

    def trigger(self, name: str) -> TriggerResult:
        return self._working_runner(name).trigger()

    def start(self, name: str) -> TriggerResult:
        return self._working_runner(name).start()

    async def stop(self, name: str) -> None:
        await self.runner(name).stop()

    async def restart(self, name: str) -> TriggerResult:
        return await self._working_runner(name).restart()

    def _working_runner(self, name: str) -> ProjectRunner:
        """Return the runner of `name`, which must still be running.

        Raises RunvisorError when it ended with an internal error: it can
        start nothing any more, and the daemon log holds the traceback.
        """
        runner = self.runner(name)
        if self._projects[name].done.is_set():
            raise RunvisorError(
                f"Project {name!r} cannot start runs: {runner.reason}. "
                "Restart the daemon to run it again."
            )
        return runner

    async def shutdown(self) -> None:
        """Stop every project, in parallel, and wait until all runs are over."""
        # Every signal first: cancelling a project is slower than signalling it.
        for hosted in self._projects.values():
            hosted.runner.signal_runs()
        for hosted in self._projects.values():
            hosted.scope.cancel()
        for hosted in list(self._projects.values()):
            await hosted.done.wait()

    # -- reload ---------------------------------------------------------------

    def preview(self, new: Config) -> ConfigDiff:
        return diff_configs(self.config, new)

    async def apply(self, new: Config) -> ConfigDiff:
        """Apply a validated config as a diff against the running one."""
        diff = diff_configs(self.config, new)
        old = self.config
        self.config = new
        self.context.settings = new.runvisor

        for name in diff.removed:
            await self._stop_project(name, "removed from the config")
        for name in diff.changed:
            await self._replace_project(old.projects[name], new.projects[name])
        for name in diff.added:
            await self._start_project(new.projects[name], start=True)
        # The new file's order becomes the listing order.
        self._projects = {
            name: self._projects[name]
            for name in new.projects
            if name in self._projects
        }
        logger.info(
            "reloaded: added=%s removed=%s changed=%s unchanged=%d",
            ",".join(diff.added) or "-",
            ",".join(diff.removed) or "-",
            ",".join(diff.changed) or "-",
            len(diff.unchanged),
        )
        return diff

    async def _replace_project(self, old: ProjectConfig, new: ProjectConfig) -> None:
        hosted = self._projects[old.name]
        runner = hosted.runner
        same_mode = old.trigger == new.trigger
        if same_mode and new.trigger != TriggerMode.ALWAYS_RUNNING:
            runner.update_project(new)
            return
        keep_stopped = runner.stopped_by_user
        await self._stop_project(old.name, "restarted: its config changed")
        await self._start_project(new, start=not keep_stopped)

    async def _start_project(self, project: ProjectConfig, *, start: bool) -> None:
        assert self._nursery is not None
        runner = ProjectRunner(project, self.context)
        hosted = _Hosted(runner=runner)
        self._projects[project.name] = hosted
        await self._nursery.start(self._host, hosted, start)

    async def _host(
        self,
        hosted: _Hosted,
        start: bool,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        status = _StartedOnce(task_status)
        try:
            with hosted.scope:
                await hosted.runner.run(start=start, task_status=status)
        except Exception as error:
            # A broken project must never take the daemon down: log the
            # traceback, mark the project fatal and keep serving the others.
            logger.exception("project %s failed inside runvisor", hosted.runner.name)
            hosted.runner.state = ProjectState.FATAL
            hosted.runner.reason = f"internal error: {error!r}; see the daemon log"
        finally:
            status.started()
            hosted.done.set()

    async def _stop_project(self, name: str, reason: str) -> None:
        hosted = self._projects.pop(name)
        hosted.runner.shutdown_reason = reason
        hosted.scope.cancel()
        await hosted.done.wait()


class _StartedOnce:
    """A task status that may be reported more than once; only the first
    call reaches trio, so a runner that fails early still releases
    `nursery.start`."""

    def __init__(self, task_status: trio.TaskStatus[None]) -> None:
        self._task_status = task_status
        self._called = False

    def started(self, value: None = None) -> None:
        if not self._called:
            self._called = True
            self._task_status.started()
