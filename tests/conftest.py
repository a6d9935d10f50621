"""Hypothesis profiles for the whole suite.

"ci" (the default) keeps every property test to a handful of examples with no deadline (the
machines are small and shared, and a first call compiles a layer) and derandomizes, so a run is
reproducible and a failure is the same failure on every machine. "thorough" is for hunting
bugs locally: `HYPOTHESIS_PROFILE=thorough pytest tests/codegen`.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=60,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
