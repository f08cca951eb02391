"""What the Label Studio ML backend needs besides the engines: the labeling config, the task
images (fetched only from the configured Label Studio), and the results Label Studio reads.

Images are fetched from `LABEL_STUDIO_URL`'s origin only (scheme, host and port), with its
token, no redirect followed off it, the upload limits applied while reading, and a timeout;
`data:` URIs are read in place. Anything else (another host or port, `file:`, `ftp:`) never
reaches the network.
"""

import base64
import binascii
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx2

from engines.errors import InvalidParameters

MAX_CONFIG_CHARS = 64 * 1024
MAX_REDIRECTS = 3
_DECLARATIONS = re.compile(r"<!(DOCTYPE|ENTITY)", re.IGNORECASE)


class RefusedImage(Exception):
    """A task image that is not fetched (foreign, malformed) or could not be."""


@dataclass(frozen=True)
class Control:
    kind: str  # "Choices" or "BrushLabels"
    name: str
    values: list[str]


@dataclass(frozen=True)
class LabelingConfig:
    image_name: str
    image_key: str
    """The task data field holding the image URL (`$image` -> `image`)."""
    controls: list[Control] = field(default_factory=list)


def parse_config(xml: str) -> LabelingConfig:
    """The Image tag and the Choices/BrushLabels tags bound to it (`toName`)."""
    if len(xml) > MAX_CONFIG_CHARS:
        raise InvalidParameters(f"label_config is over {MAX_CONFIG_CHARS} characters")
    if _DECLARATIONS.search(xml):  # no entity expansion, however nested
        raise InvalidParameters("label_config may not declare a DOCTYPE or entities")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise InvalidParameters(f"label_config is not XML: {exc}") from exc
    images = [e for e in root.iter("Image") if e.get("name") and e.get("value")]
    if not images:
        raise InvalidParameters("label_config has no <Image name=... value=...> tag")
    image = images[0]
    name, value = image.get("name", ""), image.get("value", "")
    controls = []
    for kind, child in (("Choices", "Choice"), ("BrushLabels", "Label")):
        for tag in root.iter(kind):
            if name in (tag.get("toName") or "").split(",") and tag.get("name"):
                values = [c.get("value") or "" for c in tag.iter(child) if c.get("value")]
                controls.append(Control(kind, tag.get("name", ""), values))
    return LabelingConfig(name, value.removeprefix("$"), controls)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _data_uri(uri: str, max_bytes: int) -> bytes:
    head, _, payload = uri.partition(",")
    if not head.endswith(";base64"):
        raise RefusedImage("a data: URI must be base64")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise RefusedImage("the data: URI's image is over the size limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RefusedImage("the data: URI is not valid base64") from exc


def fetch_image(
    reference: str, origin: str, token: str, max_bytes: int, timeout_seconds: float
) -> bytes:
    """The image bytes `reference` names: a data: URI, or a URL on `origin` (absolute, or a
    path such as `/data/upload/...` resolved against it)."""
    if reference.startswith("data:"):
        return _data_uri(reference, max_bytes)
    if not origin:
        raise RefusedImage("no Label Studio URL is configured: only data: URIs are read")
    url = urljoin(origin.rstrip("/") + "/", reference)
    allowed = _origin(origin)
    headers = {"Authorization": f"Token {token}"} if token else {}
    with httpx2.Client(follow_redirects=False, timeout=timeout_seconds) as client:
        for _ in range(MAX_REDIRECTS + 1):
            if _origin(url) != allowed or urlsplit(url).scheme not in ("http", "https"):
                raise RefusedImage(
                    f"{urlsplit(url).scheme}://{urlsplit(url).netloc} is not the "
                    "configured Label Studio"
                )
            try:
                with client.stream("GET", url, headers=headers) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise RefusedImage(f"Label Studio answered {response.status_code}")
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise RefusedImage("the task image is over the size limit")
                    return bytes(data)
            except httpx2.HTTPError as exc:
                raise RefusedImage(f"fetching the task image failed: {type(exc).__name__}") from exc
    raise RefusedImage("too many redirects")


def choice_result(control: Control, image_name: str, label: str) -> dict[str, object] | None:
    """A `choices` result with the predicted label, if the tag offers it (case aside)."""
    matching = [v for v in control.values if v.casefold() == label.casefold()]
    if not matching:
        return None
    return {
        "from_name": control.name,
        "to_name": image_name,
        "type": "choices",
        "value": {"choices": [matching[0]]},
    }


def brush_result(
    control: Control, image_name: str, label: str, rle: list[int], width: int, height: int
) -> dict[str, object]:
    """A `brushlabels` region: the predicted label if the tag has it, else its first label."""
    matching = [v for v in control.values if v.casefold() == label.casefold()]
    chosen = matching[0] if matching else (control.values[0] if control.values else label)
    return {
        "from_name": control.name,
        "to_name": image_name,
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [chosen]},
    }
