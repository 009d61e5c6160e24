"""The teacher-logit cache and the stores it lives in."""
