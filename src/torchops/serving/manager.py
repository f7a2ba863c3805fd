"""Which versions the server serves, kept in step with the registry's aliases.

The manager serves every model that has a ``production`` alias (or the refs it was
given), polls the registry, and on an alias move loads and warms the new version beside
the old one, switches the route in one assignment, lets requests already queued on the
old version finish, then unloads it. Explicit versions (``/versions/{v}``) are loaded on
demand beside the routed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torchops.errors import NotFound, TorchopsError, Unavailable
from torchops.refs import DEFAULT_ALIAS, ModelRef
from torchops.serving.batcher import Batcher, Observer, calibrate_batch_size
from torchops.serving.metrics import ServingMetrics
from torchops.serving.served import ServedVersion
from torchops.types import ModelVersion, Signature

if TYPE_CHECKING:
    from torchops.registry import Registry
    from torchops.runtime import Runtime

__all__ = ["ModelManager", "ServedVersion"]

log = logging.getLogger("torchops.serving")


class ModelManager:
    """Loads, routes, swaps and unloads the versions the server answers with.

    ``refs`` names what to serve (``digits``, ``digits@staging``, ``digits:3``); empty
    means every model with an ``alias`` (``production``) alias. A bare name follows the
    alias, else the latest version. ``calibrate_s`` > 0 measures the best batch size
    (at most ``max_batch_size``) for each version when it loads. ``threads`` is the
    torch intra-op thread count of each compute thread (None: torch's default).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        refs: Sequence[str] = (),
        alias: str = DEFAULT_ALIAS,
        format: str | None = None,
        max_batch_size: int = 32,
        max_delay_ms: float = 0.0,
        max_queue: int = 1024,
        poll_interval_s: float = 1.0,
        calibrate_s: float = 0.0,
        drain_timeout_s: float = 30.0,
        threads: int | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        self.registry = registry
        self.refs = tuple(refs)
        self.alias = alias
        self.format = format
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self.max_queue = max_queue
        self.poll_interval_s = poll_interval_s
        self.calibrate_s = calibrate_s
        self.drain_timeout_s = drain_timeout_s
        self.threads = threads
        self.metrics = metrics if metrics is not None else ServingMetrics()
        #: gives each version's batcher its observer when it loads (set by the monitor's
        #: service): ``(model, version, signature) -> Observer``
        self.observers: Callable[[str, int, Signature], Observer] | None = None
        self._refs: dict[str, ModelRef] = {}
        for text in self.refs:
            ref = ModelRef.parse(text)
            self._refs.setdefault(ref.name, ref)
        #: model name -> the version requests without a version go to
        self.routes: dict[str, ServedVersion] = {}
        self._versions: dict[tuple[str, int], ServedVersion] = {}
        self._pinned: set[tuple[str, int]] = set()  # loaded for explicit /versions/{v}
        self._followed: dict[str, ModelRef] = {}
        self._loaded: set[str] = set()  # loaded through the repository API
        self._unloaded: set[str] = set()  # unloaded through the repository API
        self._targets_now: dict[str, int | None] = {}
        self._failed: dict[tuple[str, int], str] = {}
        self._loading: dict[tuple[str, int], asyncio.Future[ServedVersion]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the first sync has finished, until shutdown starts."""
        return self._started and not self._closing

    async def start(self) -> None:
        """Check the refs, load what is to be served and start polling the registry."""
        if self._started:
            return
        for ref in self._refs.values():
            await asyncio.to_thread(self.registry.get, ref)  # NotFound names the bad ref
        await self.sync()
        self._started = True
        self._poller = asyncio.create_task(self._poll(), name="torchops-registry-poll")

    async def close(self) -> None:
        """Stop polling, let queued requests finish, unload everything."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        async with self._lock:
            for served in list(self._versions.values()):
                self._retire(served)
            self.routes.clear()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def _poll(self) -> None:
        last_error = ""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.sync()
            except Exception as exc:
                if repr(exc) != last_error:  # once per distinct error, not every second
                    log.exception("polling the registry failed; serving what is loaded")
                last_error = repr(exc)
            else:
                last_error = ""

    # -- lookups on the request path ----------------------------------------------------

    def route(self, name: str) -> ServedVersion:
        """The version a request without a version goes to."""
        served = self.routes.get(name)
        if served is None:
            raise self._missing(name)
        return served

    async def version(self, name: str, version: int) -> ServedVersion:
        """A specific version, loaded on first use beside the routed one."""
        served = self._versions.get((name, version))
        if served is not None:
            return served
        if name not in self.routes:
            raise self._missing(name)
        key = (name, version)
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[key] = pending
            try:
                served = await self._load(name, version)
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved: waiters re-raise it themselves
                # the exception's traceback holds this frame: without its future, the two
                # make no reference cycle, and are freed (with the request) at once
                del pending
                raise
            finally:
                del self._loading[key]
            if name not in self.routes or self._closing:  # unloaded while loading
                self._retire(served)
                raise self._missing(name)
            existing = self._versions.get(key)
            if existing is not None:  # a sync loaded it meanwhile: keep one copy
                self._retire(served)
                served = existing
            self._pinned.add(key)
            self._track(served)
            pending.set_result(served)
            return served
        return await asyncio.shield(pending)

    def served_versions(self, name: str) -> list[int]:
        return sorted(v for (n, v) in self._versions if n == name)

    def _missing(self, name: str) -> TorchopsError:
        if name in self._unloaded:
            return Unavailable(
                f"model {name!r} is unloaded; load it with POST /v2/repository/models/{name}/load"
            )
        for (model, version), reason in self._failed.items():
            if model == name:
                return Unavailable(f"model {name!r} version {version} failed to load: {reason}")
        if name in self._followed:
            if self._targets_now.get(name) is None:
                ref = self._followed[name]
                return Unavailable(f"model {name!r}: {ref} names no version now")
            return Unavailable(f"model {name!r} is not loaded yet")
        return NotFound(f"unknown model {name!r}: it is not served by this server")

    # -- the model repository extension -------------------------------------------------

    async def load(self, name: str) -> None:
        """Serve ``name`` (again): undo an explicit unload and load its target version."""
        info = await asyncio.to_thread(self.registry.get_model, name)  # NotFound if unknown
        self._unloaded.discard(info.name)
        self._loaded.add(info.name)
        self._failed = {k: v for k, v in self._failed.items() if k[0] != name}
        await self.sync()
        if name not in self.routes:
            raise self._missing(name)

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` until ``load`` is called, whatever its aliases say."""
        await asyncio.to_thread(self.registry.get_model, name)
        self._unloaded.add(name)
        self._loaded.discard(name)
        await self.sync()

    async def index(self) -> list[dict[str, Any]]:
        """Every registered model with its state, as the repository extension lists them."""
        infos = await asyncio.to_thread(self.registry.models)
        entries: list[dict[str, Any]] = []
        for info in infos:
            served = self.routes.get(info.name)
            if served is not None:
                entries.append({"name": info.name, "version": served.version_str, "state": "READY"})
                continue
            entry: dict[str, Any] = {"name": info.name, "state": "UNAVAILABLE"}
            if info.name in self._unloaded:
                entry["reason"] = "unloaded"
            elif info.name in self._followed:
                entry["reason"] = str(self._missing(info.name))
            else:
                entry["reason"] = "not served"
            entries.append(entry)
        return entries

    # -- reconciliation -----------------------------------------------------------------

    async def sync(self) -> None:
        """One pass: read the aliases, load and switch what moved, unload what left."""
        async with self._lock:
            if self._closing:
                return
            followed, targets = await asyncio.to_thread(self._targets)
            self._followed = followed
            self._targets_now = targets
            for name in list(self.routes):
                if targets.get(name) is None:
                    del self.routes[name]
                    for key, served in list(self._versions.items()):
                        if key[0] == name:
                            self._retire(served)
            for name, version in targets.items():
                if version is None:
                    continue
                current = self.routes.get(name)
                if current is not None and current.version == version:
                    continue
                if (name, version) in self._failed:
                    continue  # reported once; retried after a new target or an explicit load
                existing = self._versions.get((name, version))
                if existing is not None:
                    served = existing
                else:
                    try:
                        served = await self._load(name, version)
                    except Exception as exc:
                        reason = exc.message if isinstance(exc, TorchopsError) else repr(exc)
                        self._failed[(name, version)] = reason
                        log.error("could not load %s:%s: %s", name, version, reason)
                        continue
                    self._track(served)
                self.routes[name] = served  # the switch: one assignment
                if current is not None:
                    log.info(
                        "model %s: route moved from version %s to %s",
                        name,
                        current.version,
                        version,
                    )
                    if (name, current.version) not in self._pinned:
                        self._retire(current)
                else:
                    log.info("model %s: serving version %s", name, version)
            self._failed = {k: v for k, v in self._failed.items() if targets.get(k[0]) == k[1]}

    def _targets(self) -> tuple[dict[str, ModelRef], dict[str, int | None]]:
        """(in a worker thread) what to follow, and the version each followed ref points to."""
        aliases = self.registry.aliases()
        if self._refs:
            followed = dict(self._refs)
        else:
            followed = {n: ModelRef(n, alias=a) for (n, a) in aliases if a == self.alias}
        for name in self._loaded:
            followed.setdefault(name, ModelRef(name))
        for name in self._unloaded:
            followed.pop(name, None)
        targets: dict[str, int | None] = {}
        for name, ref in followed.items():
            if ref.version is not None:
                targets[name] = ref.version
            elif ref.alias is not None:
                targets[name] = aliases.get((name, ref.alias))
            else:
                target = aliases.get((name, self.alias))
                if target is None:
                    try:
                        target = self.registry.get_model(name).latest_version
                    except NotFound:
                        target = None
                targets[name] = target
        return followed, targets

    async def _load(self, name: str, version: int) -> ServedVersion:
        ref = ModelRef(name, version=version)
        info, runtime, batch = await asyncio.to_thread(self._load_blocking, ref)
        batcher = Batcher(
            runtime,
            model=name,
            version=version,
            max_batch_size=batch,
            max_delay_ms=self.max_delay_ms,
            max_queue=self.max_queue,
            metrics=self.metrics,
            num_threads=self.threads,
            observer=None
            if self.observers is None
            else self.observers(name, version, info.signature),
        )
        batcher.start()
        log.info("loaded %s:%s (%s, batches of up to %s)", name, version, runtime.format, batch)
        return ServedVersion(name, version, info, runtime, batcher, batch)

    def _load_blocking(self, ref: ModelRef) -> tuple[ModelVersion, Runtime, int]:
        info = self.registry.get(ref)
        runtime = self.registry.load(ref, self.format)
        batch = self.max_batch_size
        if self.calibrate_s > 0 and batch > 1:
            try:
                batch = calibrate_batch_size(
                    runtime, max_batch_size=batch, budget_s=self.calibrate_s
                )
            except BaseException:
                runtime.close()
                raise
        return info, runtime, batch

    def _track(self, served: ServedVersion) -> None:
        """Make ``served`` the loaded copy of its version (and show it in the metrics)."""
        self._versions[(served.name, served.version)] = served
        self.metrics.set_loaded(served.name, served.version, True)
        batcher = served.batcher
        # read when scraped, so the request path does not pay for keeping it current
        self.metrics.inflight_requests.labels(served.name, served.version_str).set_function(
            lambda: batcher.queue_depth + batcher.in_flight
        )

    def _retire(self, served: ServedVersion) -> None:
        """Take ``served`` out of service: drain its queue in the background, then unload."""
        if served.retired:
            return
        served.retired = True
        key = (served.name, served.version)
        if self._versions.get(key) is served:
            del self._versions[key]
        self._pinned.discard(key)
        task = asyncio.get_running_loop().create_task(self._unload(served))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _unload(self, served: ServedVersion) -> None:
        try:
            await served.batcher.drain(timeout=self.drain_timeout_s)
        except Exception:
            log.exception("draining %s:%s failed", served.name, served.version)
        finally:
            served.batcher.close()
            served.runtime.close()
            if (served.name, served.version) not in self._versions:  # no other copy serves
                self.metrics.set_loaded(served.name, served.version, False)
                with contextlib.suppress(KeyError):
                    self.metrics.inflight_requests.remove(served.name, served.version_str)
            log.info("unloaded %s:%s", served.name, served.version)
