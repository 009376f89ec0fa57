"""Tiny local models (random and trained), the arithmetic task the trained reasoner learns, and the demo."""
