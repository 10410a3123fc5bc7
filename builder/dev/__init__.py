"""Development helpers: synthetic fixtures, tiny models, the demo (never a default)."""
