"""Comparisons of methods: sweep expansion and the paired statistics."""
