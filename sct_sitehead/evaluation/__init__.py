"""BIDS datasets, metrics, evaluation and threshold tuning through the deploy path."""
