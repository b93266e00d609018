"""Integrations with other tools (imported only when used)."""
