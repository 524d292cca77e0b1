"""Numerical building blocks below the models: Hadamard transforms (torch reference implementations)."""
