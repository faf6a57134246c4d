"""Dataset folders (nnU-Net / Decathlon), their fingerprints and the brain definition."""
