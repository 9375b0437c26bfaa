"""``splitmix serve RUN``: predictions from a finished run over HTTP (FastAPI + uvicorn).

- ``GET /health`` — liveness.
- ``GET /models`` — the widths the run serves (bases, params, MACs, measured accuracy) and the
  robustness range.
- ``POST /predict`` — ``{"width": 0.5, "robustness": 0.3, "inputs": [[...image...], ...]}`` →
  predicted classes and class probabilities. Each request may ask for another width/λ; built
  mixtures are cached by the run, nothing is reloaded per request.

Bad input (unknown width, λ outside [0, 1], wrong input shape or type, non-finite values,
malformed JSON, a body over the size limit) gets a 4xx answer that says what is allowed; the
service never answers 5xx for bad input. OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from server.query import QueryError, Run

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_BATCH = 1024


class PredictRequest(BaseModel):
    width: float = Field(description="a width the run serves (see /models)")
    robustness: float = Field(0.0, description="λ in [0, 1]: 0 = standard, 1 = most robust")
    inputs: list[Any] = Field(description="a batch of images, each C×H×W (or H×W for one channel), values in [0, 1]")
    select: str = Field("first", description="which bases: 'first' k, or the 'best' k by accuracy")


def _inputs_tensor(run: Run, inputs: list[Any]) -> torch.Tensor:
    c, h, w = run.input_shape
    if not inputs:
        raise QueryError("inputs is empty; send a non-empty batch")
    if len(inputs) > MAX_BATCH:
        raise QueryError(f"batch of {len(inputs)} inputs exceeds the limit of {MAX_BATCH}")
    try:
        x = torch.tensor(inputs, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise QueryError(f"inputs must be a list of numeric arrays of shape {c}×{h}×{w} (or {h}×{w} when C = 1)") from None
    if x.dim() == 3 and c == 1:
        x = x.unsqueeze(1)
    if tuple(x.shape[1:]) != (c, h, w):
        raise QueryError(f"each input must have shape {c}×{h}×{w}, got {'×'.join(map(str, x.shape[1:])) or 'a scalar'}")
    if not torch.isfinite(x).all():
        raise QueryError("inputs contain NaN or Inf")
    return x


def create_app(run: Run) -> FastAPI:
    app = FastAPI(title="splitmix-fl model service", description=f"Serving run {run.folder}")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body over the {MAX_BODY_BYTES} byte limit"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=422)

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/models")
    def models() -> dict[str, Any]:
        lo, hi = run.robustness_range()
        return {"method": run.method_name, "input_shape": list(run.input_shape), "robustness_range": [lo, hi], "widths": run.table()}

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        if not (math.isfinite(request.width) and math.isfinite(request.robustness)):
            raise QueryError("width and robustness must be finite numbers")
        if request.select not in ("first", "best"):
            raise QueryError(f"select '{request.select}' is unknown; allowed: first, best")
        served = run.served(request.width, request.robustness, request.select)
        x = _inputs_tensor(run, request.inputs)
        with torch.no_grad():
            probs = torch.softmax(served.model(x), dim=-1)
        return {
            "width": served.width,
            "robustness": served.robustness,
            "bases": served.bases,
            "predictions": probs.argmax(-1).tolist(),
            "probabilities": probs.tolist(),
        }

    return app


def serve(run: Run, host: str = "127.0.0.1", port: int = 8080) -> None:
    import uvicorn

    uvicorn.run(create_app(run), host=host, port=port, log_level="info")
