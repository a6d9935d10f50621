"""Shared fixtures of the analysis tests: a private cache and each op analysed once."""
import pytest
from analysis_programs import all_ops

from psmc.analysis import analyse
from psmc.errors import PsmcAnalysisError


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
def analyses(private_psmc_cache):
    return Analyses()
