"""Serving side of the registry: follow the active adapter without a restart.

``AdapterWatcher`` polls the registry (one indexed query) and, when the active version changed,
asks the engine to switch (``TransformersEngine.switch_adapter``: loaded beside the base weights,
applied between decode steps once the requests in flight have finished). Promotions and rollbacks
made by the ``finetune`` command in another process reach every replica within one poll interval.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from finetune.registry import Registry

log = logging.getLogger(__name__)


class AdapterWatcher:
    def __init__(self, registry: Registry, engine, *, base_model: str, poll_seconds: float = 10.0):
        self.registry = registry
        self.engine = engine  # anything with adapter_version and switch_adapter (TransformersEngine)
        self.base_model = base_model
        self.poll_seconds = poll_seconds
        self._task: asyncio.Task | None = None
        self._refused: str | None = None  # an active version this engine cannot serve (logged once)

    async def sync(self) -> str | None:
        """Switch to the registry's active adapter if it changed; returns the version now served."""
        version = await asyncio.to_thread(self.registry.active_version)
        if version == self.engine.adapter_version or (version is not None and version == self._refused):
            return self.engine.adapter_version
        path = None
        if version is not None:
            adapter = await asyncio.to_thread(self.registry.get, version)
            if adapter is None:  # rolled back between the two queries: next poll
                return self.engine.adapter_version
            if adapter.base_model != self.base_model:
                log.error("active adapter %s was trained on %s but this service runs %s; keeping %s",
                          version, adapter.base_model, self.base_model, self.engine.adapter_version or "the base model")
                self._refused = version
                return self.engine.adapter_version
            path = Path(adapter.path)
        await self.engine.switch_adapter(version, path)
        self._refused = None
        return version

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="enclave-adapter-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.sync()
            except Exception:
                log.exception("adapter hot swap failed; still serving %s", self.engine.adapter_version or "the base model")
