"""Strategies: shared sampling/validation/averaging (base.py) and Split-Mix (splitmix.py)."""
