"""Pipeline stages: each turns a batch of Samples into the same batch, enriched or rejected."""
