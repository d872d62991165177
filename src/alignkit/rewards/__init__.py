"""Rewards: one interface over programmatic functions, trained reward models and combinations."""
