"""Test checkpoints that lvb builds itself (no model hub is needed)."""
