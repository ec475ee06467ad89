"""Chunkers: Markdown cut at headings (markdown.py), code cut at definitions (code.py)."""
