"""Command-line tools: SAM masks for training annotations, detection files, the virtuous-circle driver."""
