"""SMTP AUTH: the cred portal, its checker and realm, and the lockout tracker.

The checker verifies a user name and password against ``smtp.auth.users``
(an scrypt hash, or a secret holding the plain password) on a thread, since
scrypt is slow by design.  Unknown users cost the same time as known ones,
so the answer's timing does not tell which names exist.  The realm's avatar
is an :class:`AuthenticatedUser` carrying what that user may send as.
:class:`Lockout` counts failed AUTHs per address; ``apply`` gives it a new
``smtp.auth`` without forgetting who is locked out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attr
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from smtprelay.passwords import PasswordHash, check_password, hash_password

if TYPE_CHECKING:
    from smtprelay.config import AuthConfig, User
    from smtprelay.policy import SenderPatterns


class IRelayUser(Interface):
    """The avatar of an authenticated SMTP client."""


@implementer(IRelayUser)
@attr.frozen
class AuthenticatedUser:
    name: str
    allowed: SenderPatterns | None = None


def _dummy_hash() -> PasswordHash:
    return PasswordHash.parse(hash_password(b"timing-equaliser"))


@implementer(ICredentialsChecker)
class UserChecker:
    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, users: dict[str, User], reactor: IReactorThreads,
                 threadpool: ThreadPool | None = None) -> None:
        self._users = users
        self._reactor = reactor
        self._threadpool = threadpool
        self._dummy: PasswordHash | None = None

    def _verify(self, username: str, password: bytes) -> User | None:
        user = self._users.get(username)
        if user is None:
            if self._dummy is None:
                self._dummy = _dummy_hash()
            self._dummy.verify(password)
            return None
        return user if check_password(user.password, password) else None

    def requestAvatarId(self, creds: credentials.IUsernamePassword) -> defer.Deferred[Any]:
        # fires with the user's name, a str (cred's interface says bytes: its own checkers')
        try:
            username = creds.username.decode("utf-8")
        except (UnicodeDecodeError, AttributeError):
            return defer.fail(error.UnauthorizedLogin())
        pool = self._threadpool or self._reactor.getThreadPool()
        d = threads.deferToThreadPool(self._reactor, pool, self._verify, username,
                                      creds.password)

        def result(user: User | None) -> str:
            if user is None:
                raise error.UnauthorizedLogin()
            return user.name

        return d.addCallback(result)


@implementer(portal.IRealm)
class UserRealm:
    def __init__(self, users: dict[str, User]) -> None:
        self._users = users

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any
                      ) -> tuple[type[IRelayUser], AuthenticatedUser, Callable[[], None]]:
        if IRelayUser not in interfaces:
            raise NotImplementedError("smtprelay knows only IRelayUser")
        user = self._users[avatarId]
        return IRelayUser, AuthenticatedUser(user.name, user.allowed), lambda: None


def make_portal(users: dict[str, User], reactor: IReactorThreads) -> portal.Portal:
    return portal.Portal(UserRealm(users), [UserChecker(users, reactor)])


class Lockout:
    """``max_failures`` failed AUTHs from one address within ``window``
    seconds lock that address out for ``window`` seconds (smtp.auth.lockout)."""

    MAX_TRACKED = 100_000

    def __init__(self, clock: IReactorTime, max_failures: int, window: float) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self._failures: dict[str, list[float]] = {}  # address -> times
        self._locked: dict[str, float] = {}  # address -> until
        self.lockouts: list[tuple[float, str]] = []  # (time, address), for warnings

    def apply(self, auth: AuthConfig) -> None:
        """Take ``smtp.auth``'s limits from a new configuration; addresses locked
        out stay so until the end of the lockout they were given."""
        self.max_failures = auth.max_failures
        self.window = auth.lockout

    def locked(self, address: str) -> bool:
        until = self._locked.get(address)
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self._locked[address]
            return False
        return True

    def failure(self, address: str) -> bool:
        """Record a failure -> True when it locks the address out."""
        now = self.clock.seconds()
        recent = [t for t in self._failures.get(address, ()) if t > now - self.window]
        recent.append(now)
        if len(recent) >= self.max_failures:
            self._failures.pop(address, None)
            self._locked[address] = now + self.window
            self.lockouts.append((now, address))
            self.lockouts = [(t, a) for t, a in self.lockouts if t > now - 86400]
            return True
        self._failures[address] = recent
        if len(self._failures) > self.MAX_TRACKED:
            self._prune(now)
        return False

    def _prune(self, now: float) -> None:
        for address in [a for a, ts in self._failures.items() if ts[-1] <= now - self.window]:
            del self._failures[address]
        if len(self._failures) > self.MAX_TRACKED:
            # under a flood of distinct addresses keep the newest half
            keep = sorted(self._failures.items(), key=lambda kv: kv[1][-1])[self.MAX_TRACKED // 2:]
            self._failures = dict(keep)

    def recent_lockouts(self, seconds: float = 3600) -> list[tuple[float, str]]:
        now = self.clock.seconds()
        return [(t, a) for t, a in self.lockouts if t > now - seconds]
