"""The plan fence: a cluster client's request names the plan version it routed by (gRPC metadata
PLAN_METADATA_KEY); a daemon that has taken up a newer plan refuses it with FAILED_PRECONDITION and
its version (in the message and the trailing metadata), and the client reloads the plan and retries.

Taking up a plan waits for the requests admitted under older versions to finish: once a daemon
reports a version in its registration, no request routed by an older plan can still land on it.
That is what lets a move copy a shard after every daemon reported the plan that dual-writes it:
no write routed by the plan before (which wrote one layout only) is still in flight anywhere.
Requests without the metadata (plain clients, the move's own copy) are neither fenced nor counted.
"""

from __future__ import annotations

import logging
import threading
import time

from embtier.wire import PLAN_METADATA_KEY

from embtierd.errors import FailedPreconditionError, InvalidArgumentError

log = logging.getLogger(__name__)


class StalePlanError(FailedPreconditionError):
    def __init__(self, theirs: int, ours: int):
        super().__init__(f"stale plan: the request was routed by plan version {theirs}; this daemon serves "
                         f"version {ours} (reload the plan and retry)")
        self.current = ours


class PlanFence:
    def __init__(self) -> None:
        self.version = 0
        self._cond = threading.Condition()
        self._in_flight: dict[int, int] = {}  # fence version at admission -> requests still running

    @staticmethod
    def requested(metadata) -> int | None:
        """The plan version a request's metadata names (None: not a cluster request)."""
        for key, value in metadata or ():
            if key == PLAN_METADATA_KEY:
                try:
                    return int(value)
                except ValueError:
                    raise InvalidArgumentError(f"metadata {PLAN_METADATA_KEY} = {value!r} is not a plan "
                                               f"version") from None
        return None

    def enter(self, version: int) -> int:
        """Admits a request routed by plan version; the token to give exit()."""
        with self._cond:
            if version < self.version:
                raise StalePlanError(version, self.version)
            token = self.version
            self._in_flight[token] = self._in_flight.get(token, 0) + 1
            return token

    def exit(self, token: int) -> None:
        with self._cond:
            left = self._in_flight[token] - 1
            if left:
                self._in_flight[token] = left
            else:
                del self._in_flight[token]
                self._cond.notify_all()

    def advance(self, version: int, timeout: float = 60.0) -> bool:
        """Takes up plan version: requests routed by an older one are refused from now on; returns once
        those admitted before have finished (False if some still run after timeout seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if version <= self.version:
                return True
            self.version = version
            while any(v < version for v in self._in_flight):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("plan version %d taken up with requests of older plans still running", version)
                    return False
                self._cond.wait(left)
        return True
