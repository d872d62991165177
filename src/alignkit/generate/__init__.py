"""Generation: batched, seeded sampling."""
