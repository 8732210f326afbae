"""Reading other projects' reinforcements into this project's shard format."""
from .mldr import (
           MldrConfig,
           MldrFormatError,
           RestrictedUnpickler,
           convert_image,
           iter_rdata,
           load_torch_save,
           parse_config,
)
from .mldr_job import import_mldr

__all__ = ['MldrConfig', 'MldrFormatError', 'RestrictedUnpickler', 'convert_image', 'iter_rdata', 'load_torch_save',
           'parse_config', 'import_mldr']
