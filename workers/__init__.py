"""Worker-side code: training loops that use the paramserver service."""
