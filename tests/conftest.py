"""Shared test configuration: the netsim fixtures are available to every test."""

pytest_plugins = ["tether.netsim.pytest_plugin"]
