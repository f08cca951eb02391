"""The README's tables of settings and error codes say what the code does."""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from engines import errors as engine_errors
from service import errors as service_errors
from service.auth import Unauthorized
from service.settings import Settings

Error = TypeVar("Error", bound=Exception)
README = Path(__file__).resolve().parent.parent / "README.md"


def settings_table() -> str:
    """The settings table as the README holds it (`python -m tests.test_readme` prints it)."""
    rows = ["| setting | default | what it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = (
            "unset"
            if default is None
            else "empty"
            if hasattr(default, "get_secret_value")
            else f"`{default}`"
        )
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `ONNX_EXPLAIN_{name.upper()}` | {shown} | {text} |")
    return "\n".join(rows) + "\n"


def _subclasses(cls: type[Error]) -> Iterator[type[Error]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_the_settings_table_lists_every_setting_with_its_default() -> None:
    assert all(field.description for field in Settings.model_fields.values())
    assert settings_table() in README.read_text()


def test_the_error_table_has_every_code_with_its_status() -> None:
    documented = set(re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", README.read_text(), re.M))
    raised: set[tuple[str, str]] = set()
    for cls in _subclasses(engine_errors.EngineError):
        status = next(
            service_errors.ENGINE_ERROR_STATUS[c]
            for c in cls.__mro__
            if c in service_errors.ENGINE_ERROR_STATUS
        )
        raised.add((str(status), cls.code))
    service_classes: list[type[service_errors.ServiceError]] = [
        *_subclasses(service_errors.ServiceError),
        Unauthorized,
    ]
    for service_error in service_classes:
        raised.add((str(service_error.status_code), service_error.code))
    raised.add(("500", "internal_error"))
    raised.update((str(s), c) for s, c in service_errors._HTTP_CODES.items())
    assert raised - documented == set()
    assert documented - raised == set()


if __name__ == "__main__":
    print(settings_table(), end="")
