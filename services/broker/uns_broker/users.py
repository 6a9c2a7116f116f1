"""The broker's password file: ``user:argon2-hash`` lines, as amqtt's FileAuthPlugin reads them."""

from __future__ import annotations

import os
from pathlib import Path

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from uns import ConfigError


def set_password(file: Path, username: str, password: str) -> None:
    """Add ``username`` to ``file`` or change its password; the file is kept private (0600)."""
    if not username or ":" in username or username != username.strip():
        raise ConfigError("username: must be non-empty, without ':' or surrounding spaces")
    if not password:
        raise ConfigError("password: empty")
    hashed = PasswordHash((Argon2Hasher(),)).hash(password)
    lines = file.read_text(encoding="utf-8").splitlines() if file.exists() else []
    lines = [ln for ln in lines if not ln.startswith(f"{username}:")]
    lines.append(f"{username}:{hashed}")
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(file, 0o600)
