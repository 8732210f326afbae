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

__all__ = ['MldrConfig', 'MldrFormatError', 'RestrictedUnpickler', 'convert_image', 'iter_rdata', 'load_torch_save',
           'parse_config']
