"""Text tasks: token labeling (semantic role labeling, punctuation restoration, NER) and summarization."""
