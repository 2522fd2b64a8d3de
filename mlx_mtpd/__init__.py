"""mlx-mtpd: multi-token-prediction heads trained by self-distillation, for MLX."""

from .blas import bind as _bind_blas

_bind_blas()  # must run before the first `import mlx.core`

from .errors import MTPDError  # noqa: E402
from .utils import load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MTPDError", "load", "__version__"]
