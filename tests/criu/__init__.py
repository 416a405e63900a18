"""Helpers for the tests against the real CRIU: a test program, netns pairs, runs."""
