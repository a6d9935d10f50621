"""Session-wide settings of the codegen tests."""
import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_psmc_cache(tmp_path_factory):
    """PSMC_CACHE_DIR for the whole session: every test compiles into a private directory,
    never the user's cache (session scope: hypothesis tests may not use function-scoped
    fixtures, and compiled modules are reused across tests)."""
    previous = os.environ.get("PSMC_CACHE_DIR")
    path = tmp_path_factory.mktemp("psmc_cache")
    os.environ["PSMC_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("PSMC_CACHE_DIR", None)
    else:
        os.environ["PSMC_CACHE_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """These tests run thousands of tiny torch calls; on a small shared machine intra-op
    threads only contend (measured: a transformer_psm step 14x slower with the default)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
