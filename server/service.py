"""``splitmix serve RUN``: predictions from a finished run over HTTP (FastAPI + uvicorn).

- ``GET /health`` — liveness.
- ``GET /models`` — the widths the run serves (bases, params, MACs, measured accuracy) and the
  robustness range.
- ``POST /predict`` — ``{"width": 0.5, "robustness": 0.3, "inputs": [[...image...], ...]}`` →
  predicted classes and class probabilities. Each request may ask for another width/λ; built
  mixtures are cached by the run, nothing is reloaded per request.

Bad input (unknown width, λ outside [0, 1], wrong input shape or type, input values that are
non-finite or outside [0, 1], malformed JSON, a body over the size limit) gets a 4xx answer that
says what is allowed; the service never answers 5xx for bad input. Nor does it return what the
model cannot answer: non-finite outputs get 422 instead of NaN probabilities. OpenAPI docs are at
``/docs``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from server.body_limit import BodyLimit
from server.query import INPUT_RANGE, INPUT_TOLERANCE, QueryError, Run, ServedModel

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_BATCH = 1024


class OutputError(Exception):
    """The model gave non-finite outputs for valid inputs (e.g. weights that overflow): refused
    with 422 rather than answered with NaN probabilities."""


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
        x = torch.tensor(inputs, dtype=torch.float64)  # float64: 3e38 must not become Inf before the range check
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise QueryError(f"inputs must be a list of numeric arrays of shape {c}×{h}×{w} (or {h}×{w} when C = 1)") from None
    if x.dim() == 3 and c == 1:
        x = x.unsqueeze(1)
    if tuple(x.shape[1:]) != (c, h, w):
        raise QueryError(f"each input must have shape {c}×{h}×{w}, got {'×'.join(map(str, x.shape[1:])) or 'a scalar'}")
    _check_values(x.flatten(1))
    return x.float()


def _check_values(rows: torch.Tensor) -> None:
    """Every value finite and in INPUT_RANGE (``rows``: one flattened input per row)."""
    lo, hi = INPUT_RANGE
    allowed = f"allowed: finite values in [{lo:g}, {hi:g}] (pixels scaled to [{lo:g}, {hi:g}], as in training)"
    non_finite = ~torch.isfinite(rows)
    if non_finite.any():
        raise QueryError(f"NaN or Inf in {_which(non_finite.any(1))}; {allowed}")
    outside = (rows < lo - INPUT_TOLERANCE) | (rows > hi + INPUT_TOLERANCE)
    if outside.any():
        raise QueryError(f"value {rows[outside][0].item():g} in {_which(outside.any(1))} is outside the input range; {allowed}")


def _which(bad: torch.Tensor) -> str:
    """'input 3' / 'inputs 0, 2, 4, 5, 6 and 7 more': the inputs flagged in ``bad`` (the first five)."""
    idx = bad.nonzero().flatten().tolist()
    if len(idx) == 1:
        return f"input {idx[0]}"
    more = f" and {len(idx) - 5} more" if len(idx) > 5 else ""
    return f"inputs {', '.join(map(str, idx[:5]))}{more}"


def _probabilities(served: ServedModel, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities, or OutputError when any row of them (or of the logits) is not finite."""
    with torch.no_grad():
        logits = served.model(x)
        probs = torch.softmax(logits, dim=-1)
    bad = ~(torch.isfinite(logits).all(-1) & torch.isfinite(probs).all(-1))
    if bad.any():
        raise OutputError(
            f"the model at width {served.width:g}, robustness {served.robustness:g} gives non-finite outputs (NaN or Inf) "
            f"for {_which(bad)} of {len(x)}: the run's weights hold NaN or overflow there; no probabilities are returned"
        )
    return probs


def create_app(run: Run) -> FastAPI:
    app = FastAPI(title="splitmix-fl model service", description=f"Serving run {run.folder}")
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=422)

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(OutputError)
    async def bad_output(request: Request, exc: OutputError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/models")
    def models() -> dict[str, Any]:
        lo, hi = run.robustness_range()
        return {
            "method": run.method_name,
            "input_shape": list(run.input_shape),
            "input_range": list(INPUT_RANGE),
            "robustness_range": [lo, hi],
            "widths": run.table(),
        }

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        if not (math.isfinite(request.width) and math.isfinite(request.robustness)):
            raise QueryError("width and robustness must be finite numbers")
        if request.select not in ("first", "best"):
            raise QueryError(f"select '{request.select}' is unknown; allowed: first, best")
        served = run.served(request.width, request.robustness, request.select)
        probs = _probabilities(served, _inputs_tensor(run, request.inputs))
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
