"""API keys -> users, from a config file and/or the environment.

File (TOML or JSON):      [keys]                      {"keys": {"sk-alice-...": "alice"}}
                          "sk-alice-..." = "alice"
Environment:              LATENTMEM_API_KEYS="sk-alice-...:alice,sk-bob-...:bob"

Several keys may map to one user; one key mapped to two users is refused (which user would it
be?). A user name is also a folder name under the data directory, so it must match `NAME_PATTERN`
whole (`fullmatch`: a trailing newline is not part of a name). Keys are kept only as SHA-256
digests and compared by digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from pathlib import Path

ENV_VAR = "LATENTMEM_API_KEYS"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always used with fullmatch
MIN_KEY_LENGTH = 16


class AuthConfigError(ValueError):
    """The API key configuration is missing or malformed."""


class KeyTable:
    """Looks up the user of a bearer key; never stores the keys themselves."""

    def __init__(self, keys: dict[str, str]):
        self._users = {_digest(key): user for key, user in keys.items()}

    def user(self, key: str | None) -> str | None:
        return self._users.get(_digest(key)) if key else None

    def values(self):
        return self._users.values()

    def __len__(self) -> int:
        return len(self._users)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str | Path | None = None, environ: dict | None = None) -> KeyTable:
    """Keys from `path` (if given) and from `$LATENTMEM_API_KEYS`; at least one is required."""
    environ = os.environ if environ is None else environ
    pairs = _read_file(Path(path)) if path is not None else []
    for item in filter(None, (part.strip() for part in environ.get(ENV_VAR, "").split(","))):
        key, sep, user = item.rpartition(":")
        if not sep:
            raise AuthConfigError(f"{ENV_VAR} entries must be KEY:USER, got one without ':'")
        pairs.append((key, user))
    keys: dict[str, str] = {}
    for key, user in pairs:
        if keys.setdefault(key, user) != user:
            raise AuthConfigError(f"one API key is given to two users, {keys[key]!r} and {user!r}; give each its own")
    if not keys:
        raise AuthConfigError(f"no API keys configured: pass --keys FILE or set {ENV_VAR}=KEY:USER[,KEY:USER...]")
    for key, user in keys.items():
        if not isinstance(user, str) or not NAME_PATTERN.fullmatch(user):
            raise AuthConfigError(f"user name {user!r} must match {NAME_PATTERN.pattern}")
        if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
            raise AuthConfigError(f"the key of user {user!r} must be >= {MIN_KEY_LENGTH} characters without spaces")
    return KeyTable(keys)


def _read_file(path: Path) -> list[tuple[str, str]]:
    """The file's (key, user) pairs, repeats included (TOML refuses a repeated key itself; JSON keeps the last)."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text, object_pairs_hook=_Pairs) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise AuthConfigError(f"cannot read API keys from {path}: {err}") from err
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, dict):
        raise AuthConfigError(f"{path} must hold a table 'keys' mapping each API key to a user name")
    return keys.pairs if isinstance(keys, _Pairs) else list(keys.items())


class _Pairs(dict):
    """A JSON object that remembers every (key, value) pair it was given, in order."""

    def __init__(self, pairs: list[tuple]):
        super().__init__(pairs)
        self.pairs = pairs
