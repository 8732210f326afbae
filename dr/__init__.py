"""dr: BAKE self-distillation and Dataset Reinforcement on top of timm."""
__version__ = '0.1.0'
