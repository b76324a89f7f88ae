"""negcase workers: the loss detector, the trainer, the inference worker and the CLI."""
