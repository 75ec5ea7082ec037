"""Fused ops: each file holds one op's reference math, kernel, launcher and torch fallback."""
