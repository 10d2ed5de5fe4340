"""kvfs.models: load safetensors models from kvfs (or any path) into torch tensors, CPU or CUDA.

Layout: ``header`` parses and validates safetensors headers, ``reader`` holds the range readers (local
or mounted paths with ``os.preadv``; the kvfs client library without a mount), ``loader`` plans large
aligned span reads and runs them in parallel into CPU memory, through pinned buffers to a GPU, or with
kvikio ``CuFile`` reads into device memory. ``cli`` is the ``kvfs models`` command.
"""

from kvfs.models.header import DTYPES as DTYPES
from kvfs.models.header import Header as Header
from kvfs.models.header import SafetensorsError as SafetensorsError
from kvfs.models.header import TensorInfo as TensorInfo
from kvfs.models.header import parse_header as parse_header
from kvfs.models.loader import LoadOptions as LoadOptions
from kvfs.models.loader import Progress as Progress
from kvfs.models.loader import load_safetensors as load_safetensors
from kvfs.models.loader import read_header as read_header
from kvfs.models.loader import safe_open as safe_open
from kvfs.models.reader import ClientSource as ClientSource
from kvfs.models.reader import LocalSource as LocalSource
