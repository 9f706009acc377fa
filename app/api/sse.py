"""Server-sent events: the one place where a streamed answer becomes bytes on the wire.

Each chunk of the chat service's :class:`AnswerEvents` is one ``data: {json}`` event (only the
fields the service set, so deltas stay as small as OpenAI's), then ``data: [DONE]``; a stream that
fails after it started ends with an OpenAI error body as its last event instead of ``[DONE]``.
"""

from __future__ import annotations

import json
from contextlib import aclosing

from fastapi.responses import StreamingResponse

from app.api.errors import failure
from app.services.chat import AnswerEvents, StreamFailure

DONE = "data: [DONE]\n\n"


def frame(item) -> str:
    if isinstance(item, StreamFailure):
        return f"data: {json.dumps(failure(item.error)[1], ensure_ascii=False)}\n\n"
    return f"data: {json.dumps(item.model_dump(exclude_unset=True), ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """A streamed answer that always gives its engine place back: a client that leaves before the
    first byte means the generator never started, so its own ``finally`` never runs."""

    def __init__(self, events: AnswerEvents):
        async def body():
            failed = False
            # A client that disconnects closes this generator, and aclosing closes the service's
            # stream at once (and with it the engine's), freeing the request's slot in the batch.
            async with aclosing(events) as items:
                async for item in items:
                    failed = isinstance(item, StreamFailure)
                    yield frame(item)
            if not failed:
                yield DONE

        super().__init__(body(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_end = events.abandon

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()
