"""Service settings, read from `ONNX_EXPLAIN_*` environment variables."""

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONNX_EXPLAIN_", extra="ignore")

    model_repository: Path = Field(
        default=Path("models"), description="Folder with one subfolder per model."
    )
    cache_dir: Path = Field(
        default=Path("cache"), description="Writable folder for prepared gradient graphs."
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto` uses CUDA when onnxruntime offers it, else CPU."
    )
    intra_op_threads: int = Field(
        default_factory=_default_threads, ge=0, le=256, description="Threads per session."
    )
    inter_op_threads: int = Field(default=1, ge=0, le=64)
    inference_concurrency: int = Field(
        default=2, ge=1, le=64, description="Inference calls running at once per process."
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body accepted."
    )
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=64)
    min_image_side: int = Field(default=8, ge=1, le=1024)
    max_passes: int = Field(
        default=4096, ge=1, le=1_000_000, description="Forward passes one request may cost."
    )
    occlusion_memory_budget_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024 * 1024,
        description="Memory for occluded copies and their activations in flight at once; "
        "sets occlusion's batch size.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
