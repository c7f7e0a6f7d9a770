"""Block (and later function) ordering algorithms."""
