"""Query job: served models, export round trip, and the HTTP service started for real."""

import asyncio
import json
import math
import os
import random
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

import splitmix
from models.blocks import routed, set_route
from server.federation import run_federation
from server.service import MAX_BODY_BYTES, create_app
from splitmix.config import load_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import InProcessGrid

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        overrides=f"num-clients=4 num-rounds=2 local-epochs=1 pgd-steps=2 eval-pgd-steps=1 eval-lambdas='0,1' out-dir='{out}' run-name=q"
    )
    return run_federation(InProcessGrid(4), cfg)


def test_mixed_model_is_the_mean_of_its_bases(run_dir):
    run = splitmix.load_run(run_dir)
    x = torch.rand(6, 1, 8, 8)
    from models.splitmix import build_mixture

    bases = torch.stack([build_mixture(run.spec, run.state, [b])(x) for b in range(3)])
    torch.testing.assert_close(run.served(0.375).module(x), bases.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.model(0.375)(x), bases.mean(0), rtol=1e-4, atol=1e-5)  # BN folded
    assert run.model(0.375) is run.model(0.375)  # cached, not rebuilt


def test_lambda_endpoints_are_the_pure_bn_paths(run_dir):
    run = splitmix.load_run(run_dir)
    x = torch.rand(6, 1, 8, 8)
    from models.splitmix import build_mixture

    reference = build_mixture(run.spec, run.state, [0, 1])
    with torch.no_grad():
        with routed(reference, "clean"):
            clean = reference(x)
        with routed(reference, "adv"):
            adv = reference(x)
        torch.testing.assert_close(run.served(0.25, 0.0).module(x), clean)
        torch.testing.assert_close(run.served(0.25, 1.0).module(x), adv)
        torch.testing.assert_close(run.model(0.25, 0.0)(x), clean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(run.model(0.25, 1.0)(x), adv, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(clean, adv)


def test_export_reproduces_in_memory_logits(run_dir, tmp_path):
    run = splitmix.load_run(run_dir)
    card = run.export(0.5, 0.3, tmp_path)
    assert card["bases"] == [0, 1, 2, 3] and card["width"] == 0.5 and card["params"] > 0
    x = torch.rand(7, 1, 8, 8)
    expected = run.model(0.5, 0.3)(x)
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    torch.testing.assert_close(program(x), expected)
    rebuilt = run.spec.build(4)
    rebuilt.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    set_route(rebuilt, 0.3)
    torch.testing.assert_close(rebuilt.eval()(x), expected, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "model_card.json").read_text())["robustness"] == 0.3


def test_best_bases_follow_recorded_accuracy(run_dir):
    run = splitmix.load_run(run_dir)
    scores = run.summary["base_accuracy"]
    assert len(scores) == 8
    best3 = run.bases_for(0.375, "best")
    assert sorted(best3) == sorted(sorted(range(8), key=lambda i: (-scores[i], i))[:3])


@pytest.mark.slow
def test_cli_errors_name_what_is_allowed(run_dir, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "splitmix.cli", *args], capture_output=True, text=True, cwd=Path(__file__).parents[2])

    bad_width = cli("query", str(run_dir), "--width", "0.3", "--out", str(tmp_path / "o"))
    assert bad_width.returncode == 2 and "allowed widths: 0.125" in bad_width.stderr
    bad_lambda = cli("query", str(run_dir), "--width", "0.5", "--robustness", "1.5", "--out", str(tmp_path / "o"))
    assert bad_lambda.returncode == 2 and "[0, 1]" in bad_lambda.stderr
    missing = cli("models", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "summary.json"):
        (damaged / name).write_text((run_dir / name).read_text())
    (damaged / "model.safetensors").write_bytes(b"\x00" * 40)
    report = cli("models", str(damaged))
    assert report.returncode == 2 and "damaged" in report.stderr
    ok = cli("models", str(run_dir))
    assert ok.returncode == 0 and "121,744" in ok.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(run_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitmix.cli", "serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port)],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("service did not start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_service_predicts_like_the_in_memory_model(run_dir, service):
    run = splitmix.load_run(run_dir)
    from splitmix.data import load_split

    test = load_split("digits", "", False)
    x = test.x[:16]
    models = httpx.get(f"{service}/models").json()
    assert models["robustness_range"] == [0.0, 1.0] and len(models["widths"]) == 8
    for width, lam in ((0.25, 0.0), (1.0, 0.7)):
        reply = httpx.post(f"{service}/predict", json={"width": width, "robustness": lam, "inputs": x.tolist()})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["predictions"] == run.model(width, lam)(x).argmax(-1).tolist()
        assert all(abs(sum(p) - 1) < 1e-4 for p in body["probabilities"])
    # 8×8 one-channel images may also be sent without the channel axis
    assert httpx.post(f"{service}/predict", json={"width": 0.5, "inputs": x[:, 0].tolist()}).status_code == 200


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"width": 0.3, "inputs": [[[0.0] * 8] * 8]}, "allowed widths"),
        ({"width": 0.5, "robustness": 1.5, "inputs": [[[0.0] * 8] * 8]}, "[0, 1]"),
        ({"width": 0.5, "inputs": [[[0.0] * 7] * 8]}, "shape 1×8×8"),
        ({"width": 0.5, "inputs": [["a"] * 8] * 8}, "numeric"),
        ({"width": 0.5, "inputs": []}, "empty"),
        ({"width": "wide", "inputs": [[[0.0] * 8] * 8]}, "width"),
        ({"inputs": [[[0.0] * 8] * 8]}, "width"),
        ({"width": 0.5, "select": "random", "inputs": [[[0.0] * 8] * 8]}, "allowed: first, best"),
    ],
)
def test_service_rejects_bad_input_with_4xx(service, body, fragment):
    reply = httpx.post(f"{service}/predict", json=body)
    assert 400 <= reply.status_code < 500 and fragment in reply.json()["detail"], reply.text


ALLOWED_VALUES = "allowed: finite values in [0, 1] (pixels scaled to [0, 1], as in training)"


@pytest.mark.parametrize(
    "value,detail",
    [
        ("3e38", f"value 3e+38 in input 1 is outside the input range; {ALLOWED_VALUES}"),  # finite in float32: no Inf to catch
        ("1e20", f"value 1e+20 in input 1 is outside the input range; {ALLOWED_VALUES}"),
        ("-0.5", f"value -0.5 in input 1 is outside the input range; {ALLOWED_VALUES}"),
        ("1.001", f"value 1.001 in input 1 is outside the input range; {ALLOWED_VALUES}"),
        ("NaN", f"NaN or Inf in input 1; {ALLOWED_VALUES}"),
        ("-Infinity", f"NaN or Inf in input 1; {ALLOWED_VALUES}"),
        ("1e400", f"NaN or Inf in input 1; {ALLOWED_VALUES}"),  # JSON number parsed to inf
    ],
    ids=["3e38", "1e20", "negative", "above-1", "nan", "-inf", "1e400"],
)
def test_service_refuses_inputs_outside_the_range(service, value, detail):
    # batch of 2: input 0 valid, input 1 all 0.5 except one pixel
    row = ", ".join(["0.5"] * 7)
    bad = f"[[[{value}, {row}]" + f", [0.5, {row}]" * 7 + "]]"
    good = "[[" + ", ".join([f"[0.5, {row}]"] * 8) + "]]"
    text = f'{{"width": 0.5, "inputs": [{good}, {bad}]}}'
    reply = httpx.post(f"{service}/predict", content=text.encode(), headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json() == {"detail": detail}, reply.text


def test_service_accepts_both_ends_of_the_range(service):
    reply = httpx.post(f"{service}/predict", json={"width": 0.5, "inputs": [[[0.0] * 8] * 8, [[1.0] * 8] * 8]})
    assert reply.status_code == 200 and len(reply.json()["predictions"]) == 2
    assert httpx.get(f"{service}/models").json()["input_range"] == [0.0, 1.0]


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_non_finite_outputs_are_refused_not_returned(run_dir, poison):
    run = splitmix.load_run(run_dir)
    run.state = dict(run.state)
    bias = run.state["base7.fc2.bias"].clone()
    bias[3] = poison  # logit 3 of base 7 is NaN / Inf for every input: so is the width-1 mixture's (bases 0..7)
    run.state["base7.fc2.bias"] = bias

    app = create_app(run)

    async def post(body: dict) -> httpx.Response:  # the app in-process
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
            return await client.post("/predict", json=body)

    reply = asyncio.run(post({"width": 1.0, "robustness": 0.5, "inputs": [[[0.5] * 8] * 8] * 2}))
    assert reply.status_code == 422, reply.text
    assert reply.json() == {
        "detail": "the model at width 1, robustness 0.5 gives non-finite outputs (NaN or Inf) for inputs 0, 1 of 2: "
        "the run's weights hold NaN or overflow there; no probabilities are returned"
    }
    assert asyncio.run(post({"width": 0.125, "inputs": [[[0.5] * 8] * 8]})).status_code == 200  # base 0 alone is sound


def test_service_rejects_malformed_and_oversized_bodies(service):
    malformed = httpx.post(f"{service}/predict", content=b'{"width": 0.5, "inputs": [', headers={"content-type": "application/json"})
    assert malformed.status_code == 422
    huge = httpx.post(f"{service}/predict", content=b"0" * (9 * 1024 * 1024), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert huge.json()["detail"] == ("request body over the 8388608 byte limit (8 MiB): Content-Length 9437184; send at most 8388608 bytes")


def _post_chunked(url: str, total: int, chunk: int, deadline_s: float = 120.0) -> tuple[bytes, int]:
    """POST ``total`` bytes of zeros to ``url``/predict as a chunked body (no Content-Length) while
    reading the reply as it comes; stop sending once a complete reply is in. Returns (reply, body
    bytes the server's socket accepted before then) — at most what it read plus the socket buffers."""
    host, port = url.removeprefix("http://").split(":")
    frame = f"{chunk:x}\r\n".encode() + b"0" * chunk + b"\r\n"
    head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=deadline_s) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        pending, frames, reply = memoryview(frame), 0, b""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            sending = frames * chunk < total
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 1.0)
            if readable:
                try:
                    data = sock.recv(1 << 16)
                except ConnectionResetError:
                    break
                reply += data
                header, _, body = reply.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: *(\d+)", header, re.IGNORECASE)
                if not data or (length and len(body) >= int(length.group(1))):
                    break
            elif writable:
                try:
                    pending = pending[sock.send(pending) :]
                except (BrokenPipeError, ConnectionResetError):
                    sending = False
                if not pending:
                    frames += 1
                    pending = memoryview(frame if frames * chunk < total else b"0\r\n\r\n")
        return reply, frames * chunk


def test_chunked_body_over_the_limit_gets_413_before_it_is_read(service):
    total = 64 * 1024 * 1024  # 8× the limit, sent in 64 KiB chunks without a Content-Length
    reply, sent = _post_chunked(service, total, 1 << 16)
    header, _, body = reply.partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.1 413 "), reply[:300]
    assert b"connection: close" in header.lower()
    detail = json.loads(body)["detail"]
    assert detail.startswith(f"request body over the {MAX_BODY_BYTES} byte limit (8 MiB): ") and "bytes received so far" in detail
    received = int(re.search(r": (\d+) bytes received so far", detail).group(1))
    assert MAX_BODY_BYTES < received <= MAX_BODY_BYTES + (1 << 20)  # refused at the first read past the limit (uvicorn reads ≤ 256 KiB)
    assert sent < total // 2, sent  # the server stopped reading: the rest was never sent


def test_service_fuzz_never_answers_5xx(service):
    rng = random.Random(0)
    valid = {"width": 0.5, "robustness": 0.2, "inputs": [[[0.5] * 8] * 8]}
    junk = [None, -1, 1e308, float("inf"), "x", [], {}, [[1]], True, "0.5", [[[None] * 8] * 8]]
    statuses = []
    for _ in range(60):
        body = dict(valid)
        for key in rng.sample(["width", "robustness", "inputs", "select", "extra"], k=rng.randint(1, 3)):
            body[key] = rng.choice(junk)
        text = json.dumps(body, allow_nan=True)
        if rng.random() < 0.3:
            text = text[: rng.randint(0, len(text))]  # truncated JSON
        reply = httpx.post(f"{service}/predict", content=text.encode(), headers={"content-type": "application/json"})
        statuses.append(reply.status_code)
    assert all(s < 500 for s in statuses), statuses
    assert any(400 <= s < 500 for s in statuses)


@pytest.mark.slow
def test_compiled_serving_matches_eager(run_dir):
    eager = splitmix.load_run(run_dir)
    compiled = splitmix.load_run(run_dir, compile=True)
    x = torch.rand(5, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(compiled.model(0.5, 0.2)(x), eager.model(0.5, 0.2)(x), rtol=1e-4, atol=1e-5)
