"""One driver per storage: the lease refuses a second holder, naming the first; a dead or silent holder's lease is
taken over; renewals keep it alive; on a URI it works the same."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from raysys.storage import lease as leases
from raysys.storage.lease import LEASE, Holder, Lease, LeaseHeld
from raysys.storage.store import Store


def _plant(store: Store, **changes) -> Holder:
    """Another driver's lease, as it would have written it."""
    holder = Holder(**{**Holder.of_this_process(60.0).__dict__, **changes})
    store.write_bytes(LEASE, holder.encode())
    return holder


def test_a_second_driver_is_refused_with_who_holds_the_storage(tmp_path):
    store = Store(tmp_path)
    first = Lease(store).acquire()
    held = json.loads((tmp_path / LEASE).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["ttl"] == leases.TTL_SECONDS
    with pytest.raises(LeaseHeld, match=rf"in use by another driver: \S+@{socket.gethostname()} \(pid {os.getpid()}\), "
                                        r"running since .*, renewed 0s ago; it expires 120s after"):
        Lease(store).acquire()
    assert json.loads((tmp_path / LEASE).read_text()) == held  # the holder's lease untouched
    first.release()
    assert not (tmp_path / LEASE).exists()
    Lease(store).acquire().release()  # free again


def test_a_lease_whose_process_died_on_this_machine_is_taken_at_once(tmp_path):
    store = Store(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    _plant(store, pid=int(dead.stdout))
    lease = Lease(store).acquire()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.holder.token
    assert not [p for p in tmp_path.iterdir() if p.name != LEASE]  # no stale copies or temporaries left
    lease.release()


def test_a_lease_from_another_machine_holds_until_its_ttl_passes_without_renewal(tmp_path):
    store = Store(tmp_path)
    _plant(store, host="gpu-node-7", pid=1, renewed=time.time() - 30)
    with pytest.raises(LeaseHeld, match=r"gpu-node-7 \(pid 1\).*renewed 30s ago; it expires 30s after"):
        Lease(store).acquire()
    _plant(store, host="gpu-node-7", pid=1, renewed=time.time() - 61)  # silent for longer than its ttl
    Lease(store).acquire().release()


def test_a_half_written_lease_holds_nothing(tmp_path):
    (tmp_path / LEASE).write_text('{"token": "abc", "us')
    Lease(Store(tmp_path)).acquire().release()


def test_a_running_driver_renews_its_lease_and_notices_when_it_lost_it(tmp_path):
    store = Store(tmp_path)
    lease = Lease(store, ttl=0.4).acquire()
    first = json.loads((tmp_path / LEASE).read_text())["renewed"]
    time.sleep(0.35)
    assert json.loads((tmp_path / LEASE).read_text())["renewed"] > first and not lease.lost
    _plant(store, host="elsewhere", ttl=60.0)  # taken over while this one was suspended
    time.sleep(0.3)
    assert lease.lost and json.loads((tmp_path / LEASE).read_text())["host"] == "elsewhere"
    lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["host"] == "elsewhere"  # never removes another's lease


def test_on_s3_the_lease_refuses_a_second_driver_too(s3_uri, monkeypatch):
    monkeypatch.setattr(leases, "_SETTLE_SECONDS", 0.05)
    store = Store(s3_uri("leased"))
    first = Lease(store).acquire()
    with pytest.raises(LeaseHeld, match=rf"pid {os.getpid()}"):
        Lease(Store(s3_uri("leased"))).acquire()
    first.release()
    assert store.read_bytes(LEASE) is None
