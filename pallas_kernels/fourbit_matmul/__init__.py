"""See reference.py and api.py."""
