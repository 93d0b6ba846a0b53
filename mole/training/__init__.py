"""Training the adapters: expert jobs, co-training, packed training, checkpoints."""
