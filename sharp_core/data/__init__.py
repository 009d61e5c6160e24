"""Where a job's text comes from and how it becomes training blocks."""
