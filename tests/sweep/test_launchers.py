"""The Ray edge's pieces: the device a trial gets, and trainables named after their stage (how the dashboard
groups a sweep's actors and tasks)."""

from raysys.stages.registry import STAGES
from raysys.sweep import launchers


def test_without_a_gpu_a_trial_runs_on_the_cpu():
    assert str(launchers.trial_device()) == "cpu"


def test_a_ray_task_without_gpus_gets_the_cpu(ray_cluster):
    @ray_cluster.remote(num_cpus=1, num_gpus=0)
    def device_of_a_trial():
        import ray

        return str(launchers.trial_device()), ray.get_gpu_ids()

    assert ray_cluster.get(device_of_a_trial.remote()) == ("cpu", [])


def test_every_stage_has_a_launcher_and_its_trainable_its_name():
    for stage in STAGES:
        assert stage.launcher in launchers.LAUNCHERS
        named = launchers._named(launchers.cell_trainable, stage)
        assert named.__name__ == f"{stage.name}_trainable"


def test_a_trial_runs_as_many_threads_as_its_stage_reserves(tmp_path):
    """The paper preset reserves 4 CPUs for a tuning or method trial and 2 for a pilot one (evaluation only):
    each trial's torch threads follow its own stage's reservation."""
    import torch

    from raysys.config import to_dict
    from tests.test_identity import paper_with_fixed_data

    study = paper_with_fixed_data()
    expected = {"pretrain": 1, "tuning": 4, "compatibility": 2, "interpolation": 2, "similarity": 2, "methods": 4,
                "search": 4, "training_free": 4, "transfer": 2, "recycle": 2}
    threads = torch.get_num_threads()
    try:
        seen = {}
        for stage in STAGES:
            launchers.trial_context(to_dict(study), str(tmp_path), stage)
            seen[stage.name] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert seen == expected


def test_root_cause_finds_the_workers_own_error_in_rays_wrapping():
    from raysys.sweep.launchers import root_cause

    class WorkerGroupError(RuntimeError):
        pass

    traceback = ("Training failed.\nTraceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
                 "    raise ValueError('bad corpus')\nValueError: bad corpus\n")
    try:
        try:
            raise WorkerGroupError(traceback)
        except WorkerGroupError as inner:
            raise RuntimeError("TrainingFailedError") from inner
    except RuntimeError as outer:
        text = root_cause(outer)
    assert text.splitlines()[0] == "ValueError: bad corpus"
    assert "from WorkerGroupError" in text and "x.py" in text
    assert root_cause(KeyError("plain")) == "KeyError: 'plain'"


def test_a_light_stages_cells_share_trials_and_a_heavy_stages_keep_their_own(micro_study):
    from raysys.stages.registry import stage
    from raysys.sweep.launchers import LIGHT_CELLS_PER_TRIAL, TRIALS_PER_SLOT, slots, trial_groups

    compatibility, tuning = stage("compatibility"), stage("tuning")
    held = slots(compatibility.resources(micro_study))  # 1 without Ray, 2 on the tests' cluster
    cells = list(range(12 * held))  # the packing looks at the groups only, not what is in them
    shared = trial_groups(compatibility, compatibility.groups(cells), micro_study)
    assert [c for group in shared for c in group] == cells  # every cell once, in plan order
    assert len(shared) == held * TRIALS_PER_SLOT and set(map(len, shared)) == {3}
    many = trial_groups(compatibility, compatibility.groups(list(range(200))), micro_study)
    assert max(map(len, many)) == LIGHT_CELLS_PER_TRIAL and sum(map(len, many)) == 200
    assert trial_groups(tuning, tuning.groups(cells), micro_study) == [[c] for c in cells]
    assert trial_groups(compatibility, [[1]], micro_study) == [[1]]


def test_with_ray_a_light_stage_keeps_every_slot_in_several_trials(ray_cluster, micro_study):
    from raysys.stages.registry import stage
    from raysys.sweep.launchers import TRIALS_PER_SLOT, slots, trial_groups

    similarity = stage("similarity")
    assert slots(similarity.resources(micro_study)) == 2  # the test cluster: 2 CPUs, a trial holds 1
    assert len(trial_groups(similarity, similarity.groups(list(range(40))), micro_study)) == 2 * TRIALS_PER_SLOT
