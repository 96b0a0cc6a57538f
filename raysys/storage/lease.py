"""One driver per storage: the lease `<storage>/.raysys-lease`, a small JSON object naming who holds it (user, host,
process, when it started) and when it last said it is alive.

Two drivers on one storage would train the same cells twice, and their rows and files would race (rows go to
whoever writes last, a bucket's directories to whoever commits first while each node caches its own bytes). So a
driver takes the lease before it touches the storage and renews it every `ttl / 4` seconds while it runs. A second
driver is refused, told who holds it and until when. A lease expires `ttl` seconds after its last renewal (its
driver died on another machine, or its machine did); on the holder's own machine it is stale at once when that
process is gone (a driver killed and rerun at once need not wait).

Taking a lease is atomic on a local or shared filesystem (a hard link cannot replace an existing file; an expired
lease is renamed away first, which only one taker can do). An object store offers no such operation through
pyarrow: there a taker writes its lease, waits, and reads it back; of two drivers started within that second of
each other, both may still read their own — what remains is said in the README.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from raysys.storage.store import Store

LEASE = ".raysys-lease"
TTL_SECONDS = 120.0
_SETTLE_SECONDS = 1.0  # an object store: how long a taker waits before reading its lease back


class LeaseHeld(RuntimeError):
    """Another driver holds the storage."""


@dataclass(frozen=True)
class Holder:
    token: str
    user: str
    host: str
    pid: int
    started: float
    renewed: float
    ttl: float

    @classmethod
    def of_this_process(cls, ttl: float) -> Holder:
        now = time.time()
        return cls(uuid.uuid4().hex, _user(), socket.gethostname(), os.getpid(), now, now, ttl)

    @classmethod
    def parse(cls, payload: bytes) -> Holder | None:
        try:
            return cls(**json.loads(payload))
        except (ValueError, TypeError):
            return None  # a lease half-written by a driver that died while writing it holds nothing

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    def alive(self, now: float) -> bool:
        """Renewed within its ttl and, on this machine, its process still running."""
        if now - self.renewed >= self.ttl:
            return False
        return self.host != socket.gethostname() or _process_exists(self.pid)

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"{self.user}@{self.host} (pid {self.pid}), running since {since}, "
                f"renewed {now - self.renewed:.0f}s ago; it expires {self.ttl - (now - self.renewed):.0f}s after "
                "its driver stops renewing it")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(store: Store) -> Holder | None:
    payload = store.read_bytes(LEASE)
    return None if payload is None else Holder.parse(payload)


def holder_alive(store: Store) -> Holder | None:
    """The live holder of the storage's lease, if any."""
    holder = read_holder(store)
    return holder if holder is not None and holder.alive(time.time()) else None


class Lease:
    """This driver's hold on a storage: `acquire` (or LeaseHeld), renewed in the background, `release` at the end.
    A renewal that finds another holder stops renewing and says so: that driver
    took over after ours stopped renewing for longer than the ttl (a suspended laptop)."""

    def __init__(self, store: Store, ttl: float = TTL_SECONDS):
        self.store, self.ttl = store, ttl
        self.holder = Holder.of_this_process(ttl)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> Lease:
        current = read_holder(self.store)
        now = time.time()
        if current is not None and current.token != self.holder.token and current.alive(now):
            raise LeaseHeld(f"--storage '{self.store.shown}' is in use by another driver: {current.describe(now)}. "
                            "Wait for it to finish, stop it, or give this run another --storage")
        if self.store.remote:
            self.store.write_bytes(LEASE, self.holder.encode())
            time.sleep(_SETTLE_SECONDS)
        else:
            self._take_local(current)
        won = read_holder(self.store)
        if won is None or won.token != self.holder.token:
            raise LeaseHeld(f"--storage '{self.store.shown}': another driver took it at the same moment"
                            + (f": {won.describe(time.time())}" if won else ""))
        self._thread = threading.Thread(target=self._renew, name="raysys-lease", daemon=True)
        self._thread.start()
        return self

    def _take_local(self, seen: Holder | None) -> None:
        """Move a dead holder's lease away (a rename: only one taker can), check it is the dead one we read, then
        link ours into place (a link never replaces an existing file)."""
        path = self.store.local / LEASE
        self.store.local.mkdir(parents=True, exist_ok=True)
        if path.exists():
            moved = path.with_name(f".tmp-{LEASE}-stale-{self.holder.token}")
            try:
                os.rename(path, moved)
            except FileNotFoundError:
                moved = None
            if moved is not None:
                taken = Holder.parse(moved.read_bytes())
                if taken is not None and taken != seen and taken.alive(time.time()):
                    try:  # a driver took it after we looked: give it back
                        os.link(moved, path)
                    except FileExistsError:
                        pass
                moved.unlink()
        temp = path.with_name(f".tmp-{LEASE}-{self.holder.token}")
        temp.write_bytes(self.holder.encode())
        try:
            os.link(temp, path)
        except FileExistsError:
            pass  # another taker was first: the caller reads it back and refuses
        finally:
            temp.unlink()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            current = read_holder(self.store)
            if current is None or current.token != self.holder.token:
                self.lost = True
                print(f"raysys: lost the lease on {self.store.shown} to "
                      f"{current.describe(time.time()) if current else 'nobody'}", flush=True)
                return
            self.holder = Holder(**{**self.holder.__dict__, "renewed": time.time()})
            try:
                self.store.write_bytes(LEASE, self.holder.encode())
            except OSError as err:  # a network blip: the next renewal tries again, well within the ttl
                print(f"raysys: could not renew the lease on {self.store.shown}: {err}", flush=True)

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def release(self) -> None:
        self.stop_renewing()
        current = read_holder(self.store)
        if current is not None and current.token == self.holder.token:
            self.store.delete_file(LEASE)
