"""Retrieval: the index that follows the chunks, hybrid search, answers with checked sources, "I don't know"."""
