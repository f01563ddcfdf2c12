"""Abstractive summarization: data readers and batches, sequence-to-sequence models, the Lightning task and ROUGE."""
