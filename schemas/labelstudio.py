"""The Label Studio ML backend's requests and answers (label-studio-ml-backend's api.py)."""

from typing import Any

from pydantic import BaseModel, Field

MAX_TASKS = 64


class SetupRequest(BaseModel):
    project: str = Field(default="", max_length=256)
    label_schema: str | None = Field(default=None, alias="schema", max_length=64 * 1024)
    hostname: str | None = Field(default=None, max_length=512)
    access_token: str | None = Field(default=None, max_length=512)
    extra_params: dict[str, Any] | str | None = None


class SetupAnswer(BaseModel):
    model_version: str


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]] = Field(max_length=MAX_TASKS)
    model_version: str | None = Field(default=None, max_length=256)
    project: str | None = Field(default=None, max_length=256)
    label_config: str = Field(max_length=64 * 1024)
    params: dict[str, Any] = Field(default_factory=dict)


class TaskPrediction(BaseModel):
    result: list[dict[str, Any]]
    score: float
    model_version: str


class PredictAnswer(BaseModel):
    results: list[TaskPrediction]


class HealthAnswer(BaseModel):
    status: str
    model_class: str
