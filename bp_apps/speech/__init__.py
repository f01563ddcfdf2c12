"""Speech-to-text: audio I/O and features, FSDD / connected-digit / synthesized / manifest data, CTC models,
greedy and beam decoding, and the Lightning tasks (see ``task.py``)."""
