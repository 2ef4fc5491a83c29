"""Command-line front ends of diffmem (diffmem-train: diffmem.cli.train)."""
