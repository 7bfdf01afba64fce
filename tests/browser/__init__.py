"""Tests of the web page in a real browser (headless Chromium from the system's packages)."""
