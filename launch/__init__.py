"""Launchers: sweeps (`python -m launch.sweep`) and cluster scripts."""
