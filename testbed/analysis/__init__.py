"""Turning runs into tables and plots."""
