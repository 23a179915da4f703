"""Pre-training and fine-tuning loops, schedules, recipes, checkpoints."""
