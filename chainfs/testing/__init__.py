"""Test and local-run helpers: real processes on loopback."""
