"""From a dataset folder to a run: planning, sampling, augmentation, the loop and resuming."""
