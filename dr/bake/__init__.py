"""BAKE: self-distillation with batch knowledge ensembling (Ge et al., 2021)."""
from .sampler import ClassAwareSampler, check_batch_size
from .targets import KNOWLEDGE_TYPES, bake_loss, bake_targets
from .task import HEAD_MODES, BakeModel, BakeTask

__all__ = [
    'ClassAwareSampler', 'check_batch_size', 'KNOWLEDGE_TYPES', 'bake_loss', 'bake_targets', 'HEAD_MODES',
    'BakeModel', 'BakeTask',
]
