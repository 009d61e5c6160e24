"""Loading and building models, pruning students from teachers, capturing attention."""
