"""Shared by the property tests (test_properties*.py): hypothesis profiles, the example counts, the tolerance.

Import it from tests as ``from property_settings import TOL, examples`` (pytest puts ``tests/`` on ``sys.path``).
Examples are derandomized (the same ones on every run, CI reproducible). ``KVPRESS_HYPOTHESIS=thorough`` runs
10x the examples with fresh randomness (``KVPRESS_HYPOTHESIS_SCALE`` sets another factor).
"""

import os
from typing import Any

from hypothesis import HealthCheck, settings

settings.register_profile(
    "kvpress-ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("kvpress-thorough", parent=settings.get_profile("kvpress-ci"), derandomize=False)
_PROFILE = settings.get_profile(f"kvpress-{os.environ.get('KVPRESS_HYPOTHESIS', 'ci')}")
_SCALE = float(os.environ.get("KVPRESS_HYPOTHESIS_SCALE", 10 if os.environ.get("KVPRESS_HYPOTHESIS") == "thorough"
                              else 1))

TOL = 1e-4
"""The largest absolute difference allowed between float32 attention outputs or logits and their oracle."""


def examples(n: int, **kw: Any) -> settings:
    """The profile with ``n`` examples (times ``KVPRESS_HYPOTHESIS_SCALE``)."""
    return settings(_PROFILE, max_examples=max(1, round(n * _SCALE)), **kw)
