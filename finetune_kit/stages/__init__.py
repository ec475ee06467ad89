"""Pipeline stages: each can run alone, be killed at any point, and be re-run without repeating work."""
