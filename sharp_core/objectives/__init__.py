"""The losses: per-row divergences and their reducers, SHARP and the attention baselines."""
