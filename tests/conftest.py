"""Test configuration: hypothesis profiles.

Local runs explore new random examples each time. CI (`.ci/run` sets
JENGA_HYPOTHESIS_PROFILE=ci) runs a fixed set, so that a landing never depends on luck;
property failures found locally are replayed from hypothesis' example database.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("JENGA_HYPOTHESIS_PROFILE", "default"))
