"""``python -m attn2onnx`` is the ``attn2onnx`` command."""

import sys

from .cli import main

sys.exit(main())
