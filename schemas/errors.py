from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(max_length=64, examples=["model_not_found"])
    message: str = Field(max_length=2000, examples=["no model named 'resnet'"])


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer has this body."""

    error: ErrorDetail
