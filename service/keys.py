"""What an API key must look like; checked when the settings are read (no web imports here)."""

import re

MIN_KEY_LENGTH = 16
MIN_DISTINCT_CHARACTERS = 8
# Printable ASCII without spaces or commas (the settings list keys comma-separated).
_KEY_CHARACTERS = re.compile(r"[!-+\--~]+")
# Words that mark a key copied from an example or left as a placeholder, matched in the key
# lower-cased with everything but letters and digits removed.
PLACEHOLDER_WORDS = (
    "changeme",
    "example",
    "placeholder",
    "password",
    "passwd",
    "secret",
    "sample",
    "dummy",
    "default",
    "replaceme",
    "yourkey",
    "yourapikey",
    "apikeyhere",
    "test",
    "todo",
    "fixme",
    "xxxx",
)

HOW_TO_GENERATE = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def split_api_keys(text: str) -> list[str]:
    """`ONNX_EXPLAIN_API_KEYS`: comma-separated, blanks around and empty entries ignored."""
    return [key.strip() for key in text.split(",") if key.strip()]


def api_key_problem(key: str) -> str | None:
    """Why `key` must not be used, or None. Never repeats the key itself."""
    if len(key) < MIN_KEY_LENGTH:
        return f"is shorter than {MIN_KEY_LENGTH} characters"
    if not _KEY_CHARACTERS.fullmatch(key):
        return "has characters other than printable ASCII (no spaces or commas)"
    normalized = re.sub(r"[^a-z0-9]", "", key.lower())
    for word in PLACEHOLDER_WORDS:
        if word in normalized:
            return f"looks like a placeholder (it contains {word!r})"
    if len(set(key)) < MIN_DISTINCT_CHARACTERS:
        return f"has fewer than {MIN_DISTINCT_CHARACTERS} distinct characters"
    return None


def check_api_keys(keys: list[str]) -> None:
    """Raises ValueError naming the first unusable key by its position."""
    for position, key in enumerate(keys, start=1):
        problem = api_key_problem(key)
        if problem is not None:
            raise ValueError(f"API key #{position} {problem}; {HOW_TO_GENERATE}")
