"""Shared fixtures: one Ray instance per test session, small data, progress bars off."""

import os

import pytest

os.environ.setdefault("STAMPRAY_PROGRESS", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep idle Ray worker processes (torch already imported) for reuse by the next Ray Data task instead of
# killing them after a second: every test's Ray instance, in this process or a scenario's subprocess,
# then skips most process start-ups. Saves several seconds per training run in the suite.
os.environ.setdefault("RAY_num_workers_soft_limit", "16")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
# Ray Train's controller collects each epoch's report when it polls (every 2 s by default); the tests'
# epochs take a fraction of that.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_shared():
    """A private local Ray with 2 CPUs, started once for the whole session (Ray's ray_start_regular_shared)."""
    import ray

    from stampray.runtime import _quiet_data_context

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    _quiet_data_context()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tno_small(tmp_path_factory):
    """A 600-stamp tno survey in 3 shards, shared by tests that only read it."""
    from stampray.synth import SynthSettings, synth

    out = str(tmp_path_factory.mktemp("tno_small"))
    synth(SynthSettings(out=out, n=600, seed=7, shard_rows=250))
    return out
