"""Dataset reinforcement (Faghri et al., 2023): write, verify, replay and train on stored teacher outputs."""
from .augment import AugmentSpec, apply_record, create_augment_spec, decode_image, replay, sample_records
from .format import AUG_NAMES, META_NAME, SCHEMA_VERSION, densify, iter_shard, load_meta, shard_name
from .importers import import_mldr
from .loader import ReinforcedDataError, check_reinforced, create_reinforced_loader
from .partners import PartnerImages
from .show import show_samples
from .sources import ImageSource, create_source
from .task import ReinforcedTask
from .teachers import TeacherEnsemble, create_teacher, parse_teacher_spec
from .verify import compute_stats, verify_dir, write_stats
from .writer import Reinforcer

__all__ = [
    'AugmentSpec', 'apply_record', 'create_augment_spec', 'decode_image', 'replay', 'sample_records', 'AUG_NAMES',
    'META_NAME', 'SCHEMA_VERSION', 'densify', 'iter_shard', 'load_meta', 'shard_name', 'ReinforcedDataError',
    'check_reinforced', 'create_reinforced_loader', 'ImageSource', 'create_source', 'ReinforcedTask',
    'TeacherEnsemble', 'create_teacher', 'parse_teacher_spec', 'compute_stats', 'verify_dir', 'write_stats',
    'Reinforcer', 'PartnerImages', 'show_samples', 'import_mldr'
]
