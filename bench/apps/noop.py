"""The HTTP ceiling: FastAPI + uvicorn with one POST route that reads the body and answers a
small JSON, with no model; served with the same uvicorn options and worker count as ours.

    uvicorn bench.apps.noop:app
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

app = FastAPI()
_ANSWER = orjson.dumps({"predictions": [{"top_k": [{"label": "0", "probability": 1.0}]}]})


@app.post("/noop")
async def noop(request: Request) -> Response:
    """Read the body, answer a fixed JSON."""
    await request.body()
    return Response(_ANSWER, media_type="application/json")


@app.get("/health")
async def health() -> Response:
    """200 once the server runs."""
    return Response(b"ok")
