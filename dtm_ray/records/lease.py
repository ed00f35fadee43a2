"""The run directory's lease: one driver at a time writes a run directory.

`lease.json` at the run's root names the driver holding it (host, pid, a random token) and a
heartbeat the driver renews every `heartbeat_s` seconds from a background thread. A second
driver finding a fresh lease refuses with one line naming the holder. A lease is stale when its
heartbeat is older than `stale_after_s`, or at once when its holder ran on this host and its
process is gone (a killed driver); a stale lease is taken over.

Works on every `pyarrow.fs` the store supports, local paths and object stores alike, because it
needs no atomic create: a driver writes its lease, waits `settle_s` and reads it back; of two
drivers that wrote at nearly the same moment, only the last writer reads its own token and goes
on, the other refuses. This holds while one driver's read-then-write takes less than `settle_s`
(milliseconds against a second here).
"""

from __future__ import annotations

import _thread
import os
import socket
import threading
import time
import uuid
from typing import Any

from dtm_ray.errors import ConfigError, StorageError
from dtm_ray.log import log
from dtm_ray.records.store import RunStore

LEASE_FILE = "lease.json"


class RunLease:
    def __init__(
        self,
        store: RunStore,
        heartbeat_s: float = 10.0,
        stale_after_s: float = 60.0,
        settle_s: float = 1.0,
    ) -> None:
        self.store = store
        self.heartbeat_s, self.stale_after_s, self.settle_s = heartbeat_s, stale_after_s, settle_s
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the lease file ---------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "token": self.token, "heartbeat": time.time()}

    def _holder_gone(self, holder: dict[str, Any]) -> str | None:
        """Why the lease `holder` no longer counts (None while it does)."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its last heartbeat was {age:.0f} s ago"
        if holder.get("host") == self.host and not _process_alive(int(holder.get("pid", -1))):
            return "its process is gone"
        return None

    def _describe(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat", 0))
        return (
            f"the driver {holder.get('host')}:{holder.get('pid')} "
            f"(last heartbeat {max(age, 0):.0f} s ago)"
        )

    # --- acquire, renew, release --------------------------------------------------------------
    def acquire(self) -> RunLease:
        """Take the lease or raise ConfigError naming its holder."""
        where = self.store.location
        holder = self.store.read_json(LEASE_FILE)
        if holder is not None and holder.get("token") != self.token:
            gone = self._holder_gone(holder)
            if gone is None:
                raise ConfigError(
                    f"run dir {where} is in use by {self._describe(holder)}; wait for it to "
                    f"finish (a killed driver's lease lapses after {self.stale_after_s:.0f} s)"
                )
            log(f"taking over the lease of {self._describe(holder)}: {gone}")
        self.store.write_json(LEASE_FILE, self._record())
        time.sleep(self.settle_s)  # let a driver that wrote at the same moment show itself
        holder = self.store.read_json(LEASE_FILE)
        if holder is None or holder.get("token") != self.token:
            other = self._describe(holder) if holder else "another driver"
            raise ConfigError(f"run dir {where} is in use by {other}, which started with this one")
        self._thread = threading.Thread(target=self._beat, name="dtm-ray-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        failing = False  # said once per outage, not at every beat
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.store.read_json(LEASE_FILE)
                if holder is None or holder.get("token") != self.token:
                    who = self._describe(holder) if holder else "nobody (the file was removed)"
                    log(f"lost the lease of {self.store.location} to {who}; stopping")
                    _thread.interrupt_main()  # the driver stops as on Ctrl-C
                    return
                self.store.write_json(LEASE_FILE, self._record())
                if failing:
                    log(f"renewed the lease of {self.store.location} again")
                    failing = False
            except Exception as err:  # noqa: BLE001 - a storage hiccup: try again next beat
                if not failing:
                    log(
                        f"could not renew the lease of {self.store.location} ({err}); trying "
                        f"again every {self.heartbeat_s:g} s"
                    )
                failing = True

    def release(self) -> None:
        """Give the lease up; never raises (it runs while another error may be on its way out):
        a lease that cannot be removed lapses after `stale_after_s` without heartbeats."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            holder = self.store.read_json(LEASE_FILE)
            if holder is not None and holder.get("token") == self.token:
                self.store.delete(LEASE_FILE)
        except (ConfigError, StorageError, OSError) as err:
            log(
                f"warning: could not remove the lease of {self.store.location} ({err}); "
                f"it lapses {self.stale_after_s:.0f} s after its last heartbeat"
            )

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
