from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from schemas.models import Readiness
from service.lifecycle import is_draining
from service.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers. Never touches a model.")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: 200 once the models are loaded and one serves, 503 before.",
    responses={503: {"model": Readiness}},
)
async def readyz(state: State, request: Request) -> JSONResponse:
    repository = state.repository
    models = {entry.name: entry.state.value for entry in repository.entries()}
    if is_draining(request.app):  # SIGTERM: stop routing here while in-flight work finishes
        status_name, status_code = "draining", 503
    elif repository.ready:
        status_name, status_code = "ok", 200
    elif not repository.loaded:
        status_name, status_code = "loading", 503
    else:
        status_name, status_code = "unavailable", 503
    body = Readiness(status=status_name, models=models)
    return JSONResponse(status_code=status_code, content=body.model_dump())
