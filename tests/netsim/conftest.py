"""Netsim tests load the harness fixtures here until tests/conftest.py lists the plugin."""

from tether.netsim.pytest_plugin import netsim, netsim_factory  # noqa: F401
