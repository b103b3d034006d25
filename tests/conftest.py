"""Test-wide settings: hypothesis profiles and offline Hugging Face."""
import os

from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# "ci": no deadline (torch.export takes ~0.1-1 s a model and the 2-core CI box is shared),
# failing examples printed as reproducible blobs; the seed is passed and printed by `make test`.
settings.register_profile("ci", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=10,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Under pytest-xdist (`make test` runs the files on one worker per core, up to 4), each worker takes an
# equal share of the cores for torch's intra-op threads, so the workers do not oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
