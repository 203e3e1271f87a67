"""Running attn2onnx models: ONNX Runtime sessions with the native kernel library registered
when it is available (:mod:`.native` builds it), else the ops' function bodies."""

from .sessions import session, session_options

__all__ = ["session", "session_options"]
