"""Held-out evaluation of a student."""
