"""What every account service shares: ids, secrets, names, roles, and the caller's scope."""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import overload

NAME_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
ID_SHAPE = re.compile(r"^[a-z]{2,6}_[0-9a-f]{24}$")
# rate limits are stored in 32-bit columns; 2.1 billion a minute is no limit anyway
MAX_LIMIT = 2**31 - 1
# moments the API accepts, in UTC: Python's datetime ends at year 9999, so an expiry of
# 9999-12-31T23:59:59-12:00 (year 10000 in UTC) could be stored by PostgreSQL and then
# never read back, failing every listing that met it
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


class AccountError(ValueError):
    """Bad input: a name, a value or a state the operation cannot accept (→ 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotFound(LookupError):
    """Missing, or belongs to another organization: callers cannot tell which (→ 404)."""

    def __init__(self, kind: str, ident: str) -> None:
        # echo only well-formed ids: a secret pasted into a path must not come back
        shown = f" with id '{ident}'" if ID_SHAPE.match(ident) else ""
        super().__init__(f"no {kind}{shown}")


class Forbidden(PermissionError):
    """The caller's role does not allow this (→ 403)."""


class Role(enum.IntEnum):
    VIEWER = 1
    ADMIN = 2
    OWNER = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise AccountError("role must be owner, admin or viewer", "role") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(slots=True, frozen=True)
class AdminScope:
    """Who is administering: an organization's admin key, or the installation's
    (organization_id None), which sees every organization."""

    key_id: str
    role: Role
    organization_id: str | None

    @classmethod
    def installation(cls) -> AdminScope:
        """The CLI: whoever can run it on the server can already read the database."""
        return cls("cli", Role.OWNER, None)

    @property
    def installation_wide(self) -> bool:
        return self.organization_id is None

    def sees(self, organization_id: str) -> bool:
        return self.organization_id is None or self.organization_id == organization_id

    def require(self, role: Role, *, installation: bool = False) -> None:
        if self.role < role:
            raise Forbidden(f"this needs an admin key with role {role.label} or higher")
        if installation and not self.installation_wide:
            raise Forbidden("this needs an installation-wide admin key")


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret(prefix: str) -> tuple[str, str, str]:
    """(secret, visible prefix, hash). Only the hash and the prefix are ever stored."""
    secret = prefix + secrets.token_urlsafe(32)
    return secret, secret[: len(prefix) + 4], hash_secret(secret)


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_SHAPE.match(name):
        raise AccountError(
            f"invalid {what} name: 1-100 letters, digits, spaces, '.', '_' or '-'", "name"
        )
    return name


def check_limit(value: int | None, what: str) -> int | None:
    if value is not None and not (isinstance(value, int) and 1 <= value <= MAX_LIMIT):
        raise AccountError(f"{what} must be an integer from 1 to {MAX_LIMIT}, or null", what)
    return value


def check_moment(moment: datetime | None, what: str) -> datetime | None:
    """A moment from a caller, in UTC and within what every database stores and reads back.
    Naive values are UTC; the comparison is made before any conversion, which could
    overflow."""
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        raise AccountError(f"{what} must be a date and time", what)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if not EARLIEST <= moment < LATEST:
        raise AccountError(f"{what} must be between {EARLIEST.year} and {LATEST.year} (UTC)",
                           what)
    return moment.astimezone(UTC)


def now() -> datetime:
    return datetime.now(UTC)


@overload
def aware(moment: datetime) -> datetime: ...


@overload
def aware(moment: datetime | None) -> datetime | None: ...


def aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def iso(moment: datetime | None) -> str | None:
    moment = aware(moment)
    return moment.isoformat().replace("+00:00", "Z") if moment else None
