"""The ``n`` choices of one request: ``n`` engine streams submitted together and read as one.

Sample ``i`` runs with seed ``seed + i`` (``SamplingParams.samples``). Submitted in the same tick, the
samples after the first wait for its prefill, then take its full prompt blocks from the prefix cache
(shared, reference-counted) and a copy of its last partial block (copy-on-write), computing only the
prompt's last token themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hf_turbo.sampling import SamplingParams

__all__ = ["Choices"]


class Choices:
    """``n`` engine streams; :meth:`start` submits them and returns their first deltas, :meth:`merged` yields
    ``(index, delta)`` as they come, :meth:`finals` the finished outputs, :meth:`aclose` aborts the rest."""

    def __init__(self, engine, prompt_ids: list[int], params: SamplingParams, rid: str) -> None:
        samples = params.samples()
        self.streams = [engine.generate(prompt_ids, p, request_id=rid if len(samples) == 1 else f"{rid}-{i}")
                        for i, p in enumerate(samples)]
        self.firsts: list = []

    async def start(self) -> list:
        """Submit every sample (one tick, so they share the prompt's blocks); their first deltas. The first
        error (ValueError, EngineOverloaded) is raised after every stream is closed."""
        got = await asyncio.gather(*(s.__anext__() for s in self.streams), return_exceptions=True)
        err = next((g for g in got if isinstance(g, BaseException)), None)
        if err is not None:
            await self.aclose()
            raise err
        self.firsts = list(got)
        return self.firsts

    async def finals(self) -> list:
        """Each sample's finished delta, in index order."""
        async def drain(i: int):
            delta = self.firsts[i]
            while not delta.finished:
                delta = await self.streams[i].__anext__()
            return delta

        return list(await asyncio.gather(*(drain(i) for i in range(len(self.streams)))))

    async def merged(self) -> AsyncIterator[tuple[int, object]]:
        """``(index, delta)`` of every sample, first deltas first, then in arrival order, until all finish."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for delta in self.streams[i]:
                    await queue.put((i, delta))
            except BaseException as exc:  # surfaced in the reader
                await queue.put((i, exc))

        live = 0
        for i, first in enumerate(self.firsts):
            yield i, first
            live += not first.finished
        tasks = [asyncio.ensure_future(pump(i)) for i, f in enumerate(self.firsts) if not f.finished]
        try:
            while live:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                live -= item.finished
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        for s in self.streams:
            await s.aclose()
