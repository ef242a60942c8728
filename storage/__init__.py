"""Where bytes live: atomic local writes now; the same calls take fsspec URLs later."""

from storage.atomic import atomic_open, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text"]
