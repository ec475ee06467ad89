"""`ftkit eval`: base, fine-tuned, retrieval and both, on held-out questions, with intervals."""
