"""Recipes: whole jobs composed from the stages (quickstart, the real-model main job)."""
