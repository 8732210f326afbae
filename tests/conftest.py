"""Shared pytest setup: keep each test process to one thread pool and headless plotting."""
import os
import sys

os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('WANDB_SILENT', 'true')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
