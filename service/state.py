"""What the routes need at run time, built once by `create_app` and kept on `app.state`."""

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request

from engines.imaging.decode import ImageLimits
from engines.methods.pipeline import WorkLimits
from engines.models.repository import ModelRepository
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    repository: ModelRepository
    image_limits: ImageLimits
    work_limits: WorkLimits
    inference_limiter: anyio.CapacityLimiter
    in_flight: int = 0


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


State = Annotated[ServiceState, Depends(get_state)]
