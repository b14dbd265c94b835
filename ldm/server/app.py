"""The HTTP side: A1111's /sdapi/v1 routes, the web page at /, errors as one line, HTTP Basic auth.

Every route answers JSON; bad input is a 422 (400 for a body that is not JSON) whose `detail` is one
line naming the field; a full queue a 503 with Retry-After; anything unexpected a 500 with a one-line
`detail` (the traceback goes to the server's log, never to the client).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import secrets
from pathlib import Path
from typing import Any, Callable

import torch
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool

from common.errors import InputError
from ldm.server.a1111 import SCHEDULERS, GenerationRequest, Img2ImgRequest, embedding_list, sampler_list
from ldm.server.jobs import OPTION_NAMES, VERSION, Limits, plan_request, png_info_response, run_plan
from ldm.server.models import Models
from ldm.server.worker import Job, Progress, QueueFull, ShuttingDown, Worker

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("ldm.server")


def create_app(models: Models, worker: Worker, limits: Limits, *, precision: str = "auto",
               outdir: Path | None = None, auth: list[tuple[str, str]] | None = None,
               max_body_bytes: int = 64 << 20, flags: dict[str, Any] | None = None) -> FastAPI:
    """The application: the worker runs the jobs, `models` holds the model, `limits` bound each request;
    `flags`: what GET /sdapi/v1/cmd-flags reports (the server's command line)."""
    app = FastAPI(title="latent-diffusion-kit", version=VERSION,
                  description="AUTOMATIC1111-compatible API (/sdapi/v1) and a web page at /")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if auth:
        app.add_middleware(BasicAuth, credentials=auth)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def wait_for(request: Request, job: Job) -> Any:
        """The job's result; if the client goes away first, the job is dropped (or interrupted if it runs)."""
        future = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if await request.is_disconnected():
                worker.cancel(job)
                log.info("client of %s #%d disconnected", job.name, job.number)
                return Response(status_code=499)

    async def generate(request: Request, body: GenerationRequest, name: str) -> Any:
        worker.check_room()  # a full queue refuses at once, before any image is decoded
        plan = await run_in_threadpool(plan_request, body, models, limits)  # image decoding off the event loop
        job = worker.submit(lambda progress: run_plan(plan, progress, models, limits, precision=precision,
                                                      outdir=outdir), name)
        return await wait_for(request, job)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request, body: GenerationRequest) -> Any:
        return await generate(request, body, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request, body: Img2ImgRequest) -> Any:
        return await generate(request, body, "img2img")

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        models.refresh()
        return [c.describe() for c in models.checkpoints]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        models.refresh()

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return sampler_list()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return [{**s, "aliases": None, "default_rho": -1, "need_inner_model": False} for s in SCHEDULERS]

    @app.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        return models.lora_list()

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> None:
        return None  # the folder is read at every request

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}  # no A1111 extensions here (clients probe for them)

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": models.current.title, "sd_checkpoint_hash": models.current.sha256,
                "samples_format": "png", "outdir_samples": str(outdir) if outdir else "",
                **models.size_info(), **{name: getattr(limits, attr) for name, attr in OPTION_NAMES.items()},
                "ldm_queue_size": worker.queue_size}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request, options: dict[str, Any] = Body(...)) -> None:
        updates = {}
        for key, value in options.items():
            if key in OPTION_NAMES or key == "ldm_queue_size":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value < (0 if key == "ldm_native_scale_limit" else 1):
                    raise InputError(f"{key}: must be a positive number, got {value!r}")
                updates[key] = value
        for key, value in updates.items():
            if key == "ldm_queue_size":
                worker.queue_size = int(value)
            else:
                attribute = OPTION_NAMES[key]
                setattr(limits, attribute, value if attribute == "native_scale_limit" else int(value))
        if "sd_model_checkpoint" in options:
            checkpoint = models.find(str(options["sd_model_checkpoint"]))
            await wait_for(request, worker.submit(lambda progress: models.load(checkpoint) and None, "load model"))
        return None

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        current: Progress | None = worker.current
        state = {"skipped": current is not None and current.job.skipped.is_set(),
                 "interrupted": worker.last_interrupted if current is None else current.job.interrupted.is_set(),
                 "stopping_generation": False,
                 "job": "" if current is None else f"{current.job.name} #{current.job.number}",
                 "job_count": worker.waiting + (current is not None), "job_timestamp": "", "job_no": worker.completed,
                 "sampling_step": current.done if current else 0, "sampling_steps": current.steps if current else 0}
        image = None
        if current is not None and not skip_current_image and current.preview is not None:
            image = await run_in_threadpool(_preview_png, current.preview)
        return {"progress": current.fraction if current else 0.0, "eta_relative": current.eta if current else 0.0,
                "state": state, "current_image": image, "textinfo": current.text if current else None,
                "current_task": state["job"] or None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> None:
        worker.skip()
        return None

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> dict[str, Any]:
        return embedding_list(models.embeddings)

    @app.post("/sdapi/v1/refresh-embeddings")
    async def refresh_embeddings(request: Request) -> None:
        await wait_for(request, worker.submit(lambda progress: models.refresh_embeddings(force=True),
                                              "refresh embeddings"))
        return None

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags() -> dict[str, Any]:
        return dict(flags or {})

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        if not isinstance(body.get("image"), str):
            raise InputError("image: missing; send {\"image\": \"<base64 PNG>\"}")
        return await run_in_threadpool(png_info_response, body["image"])

    return app


def _preview_png(preview: Callable[[], Image.Image]) -> str | None:
    try:
        buffer = io.BytesIO()
        preview().save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - a preview is optional; the job goes on either way
        log.exception("preview failed")
        return None


def _one_line(error: dict[str, Any]) -> str:
    """A pydantic error -> "field: message (got value)"."""
    where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "body"
    if error.get("type") == "json_invalid":
        return f"body: not valid JSON ({error.get('ctx', {}).get('error', error.get('msg'))}); send a JSON object"
    value = error.get("input")
    shown = "" if isinstance(value, dict) or value is None else f" (got {str(value)[:60]!r})"
    return f"{where}: {error.get('msg', 'invalid')}{shown}"


def _add_error_handlers(app: FastAPI) -> None:
    def answer(status: int, detail: str, error: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        return answer(status, _one_line(errors[0]) if errors else "invalid request", "ValidationError")

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return answer(422, str(exc).splitlines()[0], "InputError")

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return answer(503, str(exc), "QueueFull", {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, exc: ShuttingDown) -> JSONResponse:
        return answer(503, str(exc), "ShuttingDown", {"Retry-After": "30"})

    @app.exception_handler(torch.OutOfMemoryError)
    async def out_of_memory(request: Request, exc: Exception) -> JSONResponse:
        return answer(503, "out of memory: ask for fewer or smaller images", "OutOfMemory")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        first = (str(exc).splitlines() or [""])[0][:200]
        return answer(500, f"internal error ({type(exc).__name__}: {first}); the server's log has the details",
                      type(exc).__name__)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 (base64 images can be large)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _json(send, 413, f"body: {int(declared):,} bytes, more than the server's limit of "
                                          f"{self.max_bytes:,}; send smaller images")
        await self.app(scope, receive, send)


class BasicAuth:
    """ASGI middleware: HTTP Basic auth on every route (A1111's --api-auth user:pass[,user2:pass2])."""

    def __init__(self, app, credentials: list[tuple[str, str]]):
        self.app = app
        self.accepted = [base64.b64encode(f"{user}:{password}".encode()) for user, password in credentials]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        try:
            ok = scheme.lower() == b"basic" and base64.b64decode(token, validate=True) is not None and any(
                secrets.compare_digest(token.strip(), accepted) for accepted in self.accepted)
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            return await _json(send, 401, "authentication required: send the --api-auth user and password "
                                          "(HTTP Basic)", {b"www-authenticate": b'Basic realm="latent-diffusion-kit"'})
        await self.app(scope, receive, send)


async def _json(send, status: int, detail: str, headers: dict[bytes, bytes] | None = None) -> None:
    body = json.dumps({"error": "HTTPError", "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or {}).items()]})
    await send({"type": "http.response.body", "body": body})
