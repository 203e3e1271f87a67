"""Hosseini & Hosseini's attention as their public PyTorch code writes it (published_style.py)."""
