"""BAKE: self-distillation with batch knowledge ensembling (Ge et al., 2021)."""
from .sampler import ClassAwareSampler, check_batch_size
from .shuffle import BatchShuffle, shuffle_batch
from .targets import KNOWLEDGE_TYPES, bake_loss, bake_targets, random_walk_log_probs
from .task import HEAD_MODES, BakeModel, BakeTask

__all__ = [
    'ClassAwareSampler', 'check_batch_size', 'BatchShuffle', 'shuffle_batch', 'KNOWLEDGE_TYPES', 'bake_loss',
    'bake_targets', 'random_walk_log_probs', 'HEAD_MODES', 'BakeModel', 'BakeTask',
]
