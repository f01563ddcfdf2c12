"""Token labeling: data readers, taggers (BiLSTM-CRF, transformer encoders) and the Lightning task."""
