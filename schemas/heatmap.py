"""The heatmap payload every explanation method returns."""

from typing import Annotated, Literal

from pydantic import BaseModel, Field

MAX_HEATMAP_SIDE = 8192


class PngHeatmap(BaseModel):
    """An 8-bit grayscale PNG, the map min-max normalised to 0..255."""

    format: Literal["png"] = "png"
    data: str = Field(description="Base64 PNG bytes.")


class ArrayHeatmap(BaseModel):
    """The raw float values, row-major, little-endian."""

    format: Literal["array"] = "array"
    dtype: Literal["float32"] = "float32"
    shape: tuple[int, int] = Field(description="[height, width]")
    data: str = Field(description="Base64 of the little-endian float32 buffer.")


Heatmap = Annotated[PngHeatmap | ArrayHeatmap, Field(discriminator="format")]
