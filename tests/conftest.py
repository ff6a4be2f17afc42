"""Test settings: under CI the property tests draw the same examples every run (derandomized), so a
landing is judged on the same cases it was checked on; locally they explore new ones each run."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
