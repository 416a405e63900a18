"""Page sources: where a session's bytes come from."""

from .base import Extent, PageSource, SourceError
from .raw import RawImageSource

__all__ = ["Extent", "PageSource", "RawImageSource", "SourceError"]
