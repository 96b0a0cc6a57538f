"""Checkpoint storage: state round-trips through safetensors + JSON, folders are per cell and step, and the store is
the only copy."""

import torch

from raysys.storage.checkpoint import Checkpointer, latest, load_state, save_state, write
from raysys.storage.store import Store


def test_a_training_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "curve": [{"step": 1, "loss": None}],
             "nan": float("nan"), "nested": ({"a": torch.arange(3)}, 2)}
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    back = load_state(tmp_path)
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    restored.load_state_dict(back["optimizer"])  # int-keyed per-parameter state survives
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(back["rng"], state["rng"]) and back["curve"] == state["curve"]
    assert back["nan"] != back["nan"] and torch.equal(back["nested"][0]["a"], torch.arange(3))


def test_only_the_newest_whole_checkpoint_is_kept(tmp_path):
    store = Store(tmp_path)
    write(store, "cell", 4, {"step": 4})
    (tmp_path / "checkpoints" / "cell" / ".tmp-step-000000008-dead").mkdir()  # a writer that died mid-save
    newest = write(store, "cell", 12, {"step": 12})
    assert newest == tmp_path / "checkpoints" / "cell" / "step-000000012" and latest(store, "cell") == newest
    assert store.list_dirs("checkpoints/cell") == ["step-000000012"]
    Checkpointer(store, 0, "cell").done()
    assert not (tmp_path / "checkpoints" / "cell").exists()  # the dead writer's folder goes too


def test_a_checkpoint_of_another_cell_is_ignored(tmp_path):
    write(Store(tmp_path), "cell", 4, {"cell_hash": "other", "step": 4})
    assert Checkpointer(Store(tmp_path), 0, "cell").resume() is None


def test_ray_is_told_the_metrics_of_a_save_but_the_checkpoint_stays_in_the_store(tmp_path):
    saved, reported = [], []
    checkpointer = Checkpointer(Store(tmp_path), 0, "cell", on_save=lambda m, path: saved.append((m, path)),
                                on_report=reported.append)
    path = checkpointer.save(8, {"x": torch.ones(2)}, {"step": 8})
    assert saved == [({"step": 8}, path)] and path.parent == tmp_path / "checkpoints" / "cell"
    assert torch.equal(checkpointer.resume()["x"], torch.ones(2)) and checkpointer.resumed_from == 8


def test_a_spoiled_or_unreadable_checkpoint_is_set_aside_and_the_cell_starts_over(tmp_path):
    store = Store(tmp_path)
    write(store, "cell", 4, {"cell_hash": "cell", "step": 4, "w": torch.ones(3)})
    tensors = tmp_path / "checkpoints/cell/step-000000004/state.safetensors"
    spoiled = bytearray(tensors.read_bytes())
    spoiled[-1] ^= 1  # a flipped bit in the weights: the checksum sees it
    tensors.write_bytes(bytes(spoiled))
    checkpointer = Checkpointer(store, 0, "cell")
    assert checkpointer.resume() is None and checkpointer.resumed_from is None
    assert store.quarantined() == 1 and store.list_dirs("checkpoints/cell") == []

    with store.writing_dir("checkpoints/cell/step-000000008") as temp:  # whole by its manifest, yet no state
        (temp / "state.safetensors").write_bytes(b"not safetensors")
        (temp / "state.json").write_text("{}")
    assert Checkpointer(store, 0, "cell").resume() is None
    assert store.quarantined() == 2 and store.list_dirs("checkpoints/cell") == []
    reasons = sorted((tmp_path / "quarantine").glob("*.reason.txt"))
    assert "unreadable checkpoint" in reasons[1].read_text() or "unreadable checkpoint" in reasons[0].read_text()
