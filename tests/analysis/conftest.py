"""Shared fixtures of the analysis tests: a private cache and each op analysed once."""
import os

import pytest
import torch
from analysis_programs import all_ops

from psmc.analysis import analyse
from psmc.errors import PsmcAnalysisError


@pytest.fixture(scope="session", autouse=True)
def private_analysis_cache(tmp_path_factory):
    """PSMC_CACHE_DIR for the session, never the user's cache."""
    previous = os.environ.get("PSMC_CACHE_DIR")
    path = tmp_path_factory.mktemp("psmc_analysis_cache")
    os.environ["PSMC_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("PSMC_CACHE_DIR", None)
    else:
        os.environ["PSMC_CACHE_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Analyses:
    """Each op analysed at most once per session (a PsmcAnalysisError is kept as the result)."""

    def __init__(self):
        self.ops = all_ops()
        self.done = {}

    def __getitem__(self, name):
        if name not in self.done:
            try:
                self.done[name] = analyse(self.ops[name])
            except PsmcAnalysisError as err:
                self.done[name] = err
        return self.done[name]


@pytest.fixture(scope="session")
def analyses(private_analysis_cache):
    return Analyses()
