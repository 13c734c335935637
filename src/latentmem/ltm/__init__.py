"""M+ long-term memory (docs/design.md): a per-layer store of evicted slots, searched by retrieval keys.

`LongTermStore` (store.py) is the public API; table.py holds its memory-mappable arrays, layer.py
one layer's bookkeeping, index.py scoring and the FAISS indexes, files.py the on-disk format.
"""

from .files import LTMFileError
from .index import SearchSettings
from .store import LongTermStore

__all__ = ["LTMFileError", "LongTermStore", "SearchSettings"]
