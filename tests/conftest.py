"""Hypothesis profiles: random exploration by default (it finds new cases on developers'
machines), a fixed example set under CI (CI=true), so that a green CI is reproducible and a
new counterexample shows up as a local finding, not as a random CI failure."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")
