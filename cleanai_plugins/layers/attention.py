"""Placeholder while the kernel lands."""
