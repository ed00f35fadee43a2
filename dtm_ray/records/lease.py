"""The run directory's lease: one driver at a time writes a run directory.

`lease.json` at the run's root names the driver holding it (host, pid, a random token) and a
heartbeat the driver renews every `heartbeat_s` seconds from a background thread. A second
driver finding a fresh lease refuses with one line naming the holder. A lease is stale when its
heartbeat is older than `stale_after_s`, or at once when its holder ran on this host and its
process is gone (a killed driver); a stale lease is taken over.

On S3 (and stores that speak its conditional writes) the lease is atomic: it is created with
`If-None-Match: *` (only one of two drivers creating it at once succeeds), taken over and renewed
with `If-Match: <etag>` (only one of two drivers replacing the same stale lease succeeds, and a
driver whose lease was taken over learns it at its next beat), and deleted on release with
`If-Match: <etag>` too, so a driver never removes a lease another driver took over between its
read and its delete (a store that refuses conditional deletes gets a plain delete after the read,
as elsewhere). This needs boto3.

Elsewhere (local paths, GCS, a store that refuses conditional writes) it needs no atomic create:
a driver writes its lease, waits `settle_s` and reads it back; of two drivers that wrote at
nearly the same moment, only the last writer reads its own token and goes on, the other refuses.
This holds while one driver's read-then-write takes less than `settle_s` (milliseconds against a
second here).
"""

from __future__ import annotations

import _thread
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from dtm_ray.errors import ConfigError
from dtm_ray.log import log
from dtm_ray.records.store import CONNECT_TIMEOUT_S, S3_ATTEMPTS, RunStore, retrying

LEASE_FILE = "lease.json"
# How long boto3 waits for an answer to a lease request (the lease file is a few hundred bytes).
READ_TIMEOUT_S = 30.0
T = TypeVar("T")


class _Unsupported(Exception):
    """The store does not take conditional writes."""


class ConditionalLeaseFile:
    """The lease file on S3, written with conditional requests (boto3: pyarrow has none). Each
    request goes through the run dir's retries (`store.retrying`): a connect timeout, bounded
    tries, and a StorageError naming the endpoint when the store cannot be reached."""

    # What S3 answers that the lease reads as an answer, not as a failing store.
    ANSWERS = ("PreconditionFailed", "ConditionalRequestConflict", "412", "NotImplemented", "501")
    ANSWERS += ("NoSuchKey", "404")

    def __init__(
        self, client: Any, bucket: str, key: str, where: str = "", endpoint: str | None = None
    ) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.where = where or f"s3://{bucket}/{key}"  # the file and its run dir, for messages
        self.endpoint = endpoint

    @classmethod
    def of(cls, store: RunStore) -> ConditionalLeaseFile | None:
        """The lease file of an S3 run dir, reached as pyarrow reaches it (endpoint, region,
        credentials); None for other stores or without boto3."""
        import pyarrow.fs as pafs

        if not isinstance(store.fs, pafs.S3FileSystem):
            return None
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            return None
        options = store.fs.__reduce__()[1][0]  # what the filesystem was made with
        endpoint = options.get("endpoint_override") or None
        if endpoint and "://" not in endpoint:
            endpoint = f"{options.get('scheme') or 'https'}://{endpoint}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=options.get("region") or None,
            aws_access_key_id=options.get("access_key") or None,
            aws_secret_access_key=options.get("secret_key") or None,
            aws_session_token=options.get("session_token") or None,
            config=Config(
                retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
            ),
        )
        bucket, _, prefix = store.root.strip("/").partition("/")
        key = f"{prefix}/{LEASE_FILE}" if prefix else LEASE_FILE
        where = f"{LEASE_FILE} in run dir {store.location}"
        return cls(client, bucket, key, where, store.endpoint)

    def _request(self, operation: str, call: Callable[[], T]) -> T:
        """One request with the run dir's retries; botocore's failures (no connection, a
        timeout, a denied or failing request) become the StorageError of any run dir write."""
        from botocore.exceptions import BotoCoreError, ClientError

        def attempt() -> T:
            try:
                return call()
            except BotoCoreError as err:
                raise OSError(str(err)) from err
            except ClientError as err:
                if err.response.get("Error", {}).get("Code", "") in self.ANSWERS:
                    raise
                raise OSError(str(err)) from err

        return retrying(operation, self.where, attempt, self.endpoint)

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lease and its etag; (None, None) when there is none."""

        def get() -> tuple[bytes, str]:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return got["Body"].read(), got["ETag"]

        try:
            body, etag = self._request("read", get)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return json.loads(body), etag

    def write(self, record: dict[str, Any], etag: str | None) -> str | None:
        """Create the lease (`etag` None) or replace the one with `etag`; the new etag, or None
        when another driver got there first."""
        from botocore.exceptions import ClientError

        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        body = json.dumps(record).encode()
        try:
            put = self._request(
                "write",
                lambda: self.client.put_object(
                    Bucket=self.bucket, Key=self.key, Body=body, **condition
                ),
            )
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return None
            if code in ("NotImplemented", "501"):
                raise _Unsupported(code) from err
            raise
        return put["ETag"]

    def delete(self, etag: str) -> bool:
        """Delete the lease if it still has `etag`; False when it changed (another driver took
        it over) or is gone. Raises _Unsupported where the store takes no conditional delete."""
        from botocore.exceptions import ClientError

        try:
            self._request(
                "delete",
                lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag),
            )
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            if code in ("NoSuchKey", "404"):
                return False
            if code in ("NotImplemented", "501"):
                raise _Unsupported(code) from err
            raise
        return True


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
        self._file = ConditionalLeaseFile.of(store)  # None: the settle window instead
        self._etag: str | None = None

    @property
    def conditional(self) -> bool:
        """Whether this lease is held with conditional writes (atomic)."""
        return self._file is not None

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
    def _check_holder(self, holder: dict[str, Any] | None) -> None:
        """Refuse while another driver's lease counts; say so when taking over a stale one."""
        if holder is not None and holder.get("token") != self.token:
            gone = self._holder_gone(holder)
            if gone is None:
                raise ConfigError(
                    f"run dir {self.store.location} is in use by {self._describe(holder)}; wait "
                    f"for it to finish (a killed driver's lease lapses after "
                    f"{self.stale_after_s:.0f} s)"
                )
            log(f"taking over the lease of {self._describe(holder)}: {gone}")

    def _lost_race(self, holder: dict[str, Any] | None) -> ConfigError:
        other = self._describe(holder) if holder else "another driver"
        return ConfigError(
            f"run dir {self.store.location} is in use by {other}, which started with this one"
        )

    def acquire(self) -> RunLease:
        """Take the lease or raise ConfigError naming its holder."""
        if self._file is not None:
            try:
                self._acquire_conditional(self._file)
            except _Unsupported:
                where = self.store.location
                log(f"{where} takes no conditional writes: leasing with a settle wait")
                self._file = None
        if self._file is None:
            self._check_holder(self.store.read_json(LEASE_FILE))
            self.store.write_json(LEASE_FILE, self._record())
            time.sleep(self.settle_s)  # let a driver that wrote at the same moment show itself
            holder = self.store.read_json(LEASE_FILE)
            if holder is None or holder.get("token") != self.token:
                raise self._lost_race(holder)
        self._thread = threading.Thread(target=self._beat, name="dtm-ray-lease", daemon=True)
        self._thread.start()
        return self

    def _acquire_conditional(self, file: ConditionalLeaseFile) -> None:
        holder, etag = file.read()
        self._check_holder(holder)
        self._etag = file.write(self._record(), etag)
        if self._etag is None:  # another driver created or took it between our read and write
            raise self._lost_race(file.read()[0])

    def _renew(self) -> bool:
        """Write a fresh heartbeat; False when the lease is no longer ours."""
        if self._file is not None:
            etag = self._file.write(self._record(), self._etag)
            if etag is None:
                # Ours still, when an earlier renewal landed but its answer was lost.
                holder, etag = self._file.read()
                if holder is None or holder.get("token") != self.token:
                    return False
            self._etag = etag
            return True
        holder = self.store.read_json(LEASE_FILE)
        if holder is None or holder.get("token") != self.token:
            return False
        self.store.write_json(LEASE_FILE, self._record())
        return True

    def _beat(self) -> None:
        failing = False  # said once per outage, not at every beat
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._renew():
                    holder = self.store.read_json(LEASE_FILE)
                    who = self._describe(holder) if holder else "nobody (the file was removed)"
                    log(f"lost the lease of {self.store.location} to {who}; stopping")
                    _thread.interrupt_main()  # the driver stops as on Ctrl-C
                    return
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
            if self._file is not None:
                self._release_conditional(self._file)
            else:
                holder = self.store.read_json(LEASE_FILE)
                if holder is not None and holder.get("token") == self.token:
                    self.store.delete(LEASE_FILE)
        except Exception as err:  # noqa: BLE001 - storage or boto3 errors alike
            log(
                f"warning: could not remove the lease of {self.store.location} ({err}); "
                f"it lapses {self.stale_after_s:.0f} s after its last heartbeat"
            )

    def _release_conditional(self, file: ConditionalLeaseFile) -> None:
        """Delete the lease only while it is still the one read as ours (its etag then)."""
        holder, etag = file.read()
        if holder is None or holder.get("token") != self.token or etag is None:
            return  # gone, or another driver's now: not ours to remove
        try:
            deleted = file.delete(etag)
        except _Unsupported:
            self.store.delete(LEASE_FILE)  # the read above is all the check this store allows
            return
        if not deleted:
            holder = file.read()[0]
            who = self._describe(holder) if holder else "nobody"
            log(f"the lease of {self.store.location} is now held by {who}; left in place")

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
