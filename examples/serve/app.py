"""An HTTP service answering image requests with a saved DaWin predictor (FastAPI + uvicorn).

Why FastAPI + uvicorn: it is the most widely deployed Python serving stack, it installs from PyPI with two small
wheels and no system services, and it runs synchronous model code in a thread pool, which DaWinPredictor supports
(it is thread-safe). LitServe and Ray Serve add batching and autoscaling on top of the same idea but bring a much
larger runtime; the predictor drops into either unchanged.

Endpoints:

* ``GET /healthz``: mode, classes and the expected input shape.
* ``POST /v1/predict``: body = a ``.npy`` array (``numpy.save``) of preprocessed images ``[B, 3, S, S]``, float32.
* ``POST /v1/classify``: body = one encoded image (PNG, JPEG, ...), preprocessed here with open_clip's eval transform.

Both answer ``{"logits": [[...]], "predictions": [...], "labels": [...]}``. Client errors get a 4xx with a message
that says what is wrong: 400 undecodable body, 413 too large, 415 unsupported content type, 422 a well-formed array
that is not a valid batch (wrong image size, empty, wrong dtype, NaN). The service stays up after any of them.

Run: ``python examples/serve/app.py --bundle DIR`` (make a bundle with ``examples/serve/make_bundle.py``).
"""

import argparse
import io
import json
import threading
from pathlib import Path

import numpy as np
import torch

MAX_BODY_BYTES = 32 << 20
MAX_BATCH = 64
MAX_IMAGE_PIXELS = 40_000_000


class ClientError(Exception):
    """A request the service refuses; ``status`` is the 4xx code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def load_bundle(bundle: str | Path, mode: str = "cluster", *, fused_experts: bool = True, compile: bool = False):
    """(predictor, preprocess, classnames) from a directory written by ``make_bundle.py``.

    The bundle holds ``model.json`` (architecture and class names), ``theta_zs.safetensors``,
    ``theta_ft.safetensors`` and ``dawin/`` (``DaWin.save``). ``DaWin.load`` checks that the weights are the fitted
    ones by content hash."""
    from dawin_ext import load_state_dict
    from dawin_ext.integrations.openclip import CLIPClassifier, create_clip_model, register_tiny_configs
    from dawin_ext.methods.dawin import DaWin
    from dawin_ext.methods.serving import DaWinPredictor

    bundle = Path(bundle)
    meta = json.loads((bundle / "model.json").read_text())
    register_tiny_configs()
    clip, preprocess, _ = create_clip_model(meta["arch"])
    zs = load_state_dict(bundle / "theta_zs.safetensors")
    ft = load_state_dict(bundle / "theta_ft.safetensors")
    # The architecture only: DaWin never uses these weights (the head's shape comes from the checkpoint).
    clf = CLIPClassifier(clip.visual, torch.zeros_like(zs["head.weight"]), classnames=meta["classnames"]).eval()
    dawin = DaWin.load(bundle / "dawin", clf, zs, ft)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    predictor = DaWinPredictor(dawin, mode, fused_experts=fused_experts, compile=compile, input_shape=(3, size, size))
    return predictor, preprocess, list(meta["classnames"])


def parse_npy(body: bytes, predictor) -> torch.Tensor:
    """The request batch of ``/v1/predict``; raises :class:`ClientError` saying what is wrong."""
    if not body:
        raise ClientError(400, "empty body: send a .npy array [B, 3, S, S] (numpy.save)")
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ClientError(400, f"body is not a .npy array (numpy.save, no pickles): {e}") from None
    if not isinstance(arr, np.ndarray):
        raise ClientError(400, "body is an .npz archive; send one .npy array")
    if arr.dtype not in (np.float32, np.float64, np.float16):
        raise ClientError(422, f"array dtype must be float32 (or float16/float64), got {arr.dtype}")
    if arr.ndim != 4:
        raise ClientError(422, f"array must be [B, 3, S, S], got shape {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise ClientError(422, "empty batch: the array holds 0 images")
    if arr.shape[0] > MAX_BATCH:
        raise ClientError(413, f"batch of {arr.shape[0]} images; at most {MAX_BATCH} per request")
    expected = predictor.input_shape
    if expected is not None and tuple(arr.shape[1:]) != expected:
        raise ClientError(422, f"each image must have shape {list(expected)}, got {list(arr.shape[1:])}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def parse_image(body: bytes, preprocess) -> torch.Tensor:
    """The one-image batch of ``/v1/classify``; raises :class:`ClientError` saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not body:
        raise ClientError(400, "empty body: send one encoded image (PNG, JPEG, ...)")
    try:
        with Image.open(io.BytesIO(body)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ClientError(413, f"image of {img.width}x{img.height} pixels exceeds {MAX_IMAGE_PIXELS}")
            img.load()
            rgb = img.convert("RGB")
    except ClientError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ClientError(400, f"body is not a decodable image: {e}") from None
    return preprocess(rgb).unsqueeze(0)


def create_app(predictor, preprocess, classnames: list[str], request_threads: int = 8):
    """The FastAPI application around a ready predictor; ``request_threads`` bounds the concurrent predictions."""
    import contextlib

    import anyio.to_thread
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from dawin_ext.methods.serving import BadRequestError

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = int(request_threads)
        yield

    app = FastAPI(title="DaWin predictor", version="1", lifespan=lifespan)
    stats = {"ok": 0, "client_errors": 0, "server_errors": 0}
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            stats[key] += 1

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ClientError(413, f"body of {declared} bytes exceeds {MAX_BODY_BYTES}")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ClientError(413, f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
        return body

    def answer(x: torch.Tensor) -> dict:
        try:
            scores = predictor(x)
        except BadRequestError as e:
            raise ClientError(422, str(e)) from None
        pred = scores.argmax(dim=1).tolist()
        return {"logits": scores.tolist(), "predictions": pred, "labels": [classnames[i] for i in pred]}

    @app.exception_handler(ClientError)
    async def client_error(_request: Request, exc: ClientError):
        count("client_errors")
        return JSONResponse(status_code=exc.status, content={"error": exc.message})

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception):  # the service stays up; the client learns why
        count("server_errors")
        return JSONResponse(status_code=500, content={"error": f"{type(exc).__name__}: {exc}"})

    @app.get("/healthz")
    def healthz() -> dict:
        return {
            "status": "ok",
            "mode": predictor.mode,
            "input_shape": list(predictor.input_shape or []),
            "classes": classnames,
            "stats": dict(stats),
        }

    @app.post("/v1/predict")
    async def predict(request: Request):
        ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
        if ctype not in ("application/x-npy", "application/octet-stream"):
            raise ClientError(415, f"content type {ctype!r}; send application/x-npy (a numpy.save array)")
        x = parse_npy(await read_body(request), predictor)
        out = await run_in_threadpool(answer, x)
        count("ok")
        return out

    @app.post("/v1/classify")
    async def classify(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if not ctype.startswith("image/"):
            raise ClientError(415, f"content type {ctype!r}; send an image/* body (PNG, JPEG, ...)")
        body = await read_body(request)
        out = await run_in_threadpool(lambda: answer(parse_image(body, preprocess)))
        count("ok")
        return out

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="directory written by make_bundle.py")
    parser.add_argument("--mode", default="cluster", choices=["cluster", "exact"])
    parser.add_argument("--no-fused-experts", action="store_true", help="two plain expert forwards per request")
    parser.add_argument("--compile", action="store_true", help="torch.compile the request path (slow first calls)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--request-threads", type=int, default=8, help="concurrent predictions (thread pool size)")
    args = parser.parse_args(argv)
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor, preprocess, classnames = load_bundle(
        args.bundle, args.mode, fused_experts=not args.no_fused_experts, compile=args.compile
    )
    predictor.warmup((1,))
    app = create_app(predictor, preprocess, classnames, args.request_threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
