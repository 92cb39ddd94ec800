"""Integrations with inference stacks. Each module imports its framework lazily."""
