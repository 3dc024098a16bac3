"""The ASGI app ``make serve`` runs: MONAI Label's own FastAPI app, with clear answers to bad requests.

MONAI Label answers an unknown model, an unknown image or an image it cannot read with a bare
"Internal Server Error". Here an ``/infer/<model>?image=<id>`` request for a model or image the
server does not have gets a 404 whose ``detail`` names it and lists what there is, and any other
failure a 500 whose ``detail`` gives the error; the server stays up either way. Everything else is
MONAI Label's app as it ships. ``uvicorn`` loads it through ``monailabel start_server --uvicorn_app
common.apps.serve_app:app``.
"""

from __future__ import annotations

import logging

from common.apps.serve import pydicom3_shim

pydicom3_shim()

from fastapi import Request  # noqa: E402  (after the shim: monailabel imports pydicom-seg)
from fastapi.responses import JSONResponse  # noqa: E402
from monailabel.app import app  # noqa: E402
from monailabel.interfaces.exception import MONAILabelException  # noqa: E402
from monailabel.interfaces.utils.app import app_instance  # noqa: E402

log = logging.getLogger("serve")


def _infer_target(request: Request) -> tuple[str, str | None] | None:
    path = request.url.path.rstrip("/")
    if request.method != "POST" or not path.startswith("/infer/"):
        return None
    return path[len("/infer/") :], request.query_params.get("image") or None


@app.middleware("http")
async def check_infer_request(request: Request, call_next):
    target = _infer_target(request)
    if target is not None:
        model, image = target
        instance = app_instance()
        models = sorted(instance.info().get("models", {}))
        if model not in models:
            return JSONResponse(
                status_code=404, content={"detail": f"unknown model '{model}'; this server has {', '.join(models)}"}
            )
        if image is not None:
            images = instance.datastore().list_images()
            if image not in images:
                shown = ", ".join(sorted(images)[:20]) + (" ..." if len(images) > 20 else "")
                return JSONResponse(
                    status_code=404, content={"detail": f"unknown image '{image}'; the studies folder has {shown}"}
                )
    try:
        return await call_next(request)
    except MONAILabelException as e:
        log.error("%s %s: %s", request.method, request.url.path, e.msg)
        return JSONResponse(status_code=400, content={"detail": e.msg})
    except Exception as e:  # noqa: BLE001  (answer, log, stay up)
        where = f" on image '{target[1]}'" if target and target[1] else ""
        log.exception("%s %s failed%s", request.method, request.url.path, where)
        return JSONResponse(
            status_code=500, content={"detail": f"{request.url.path}{where} failed: {type(e).__name__}: {e}"}
        )
