"""Layer 2, store: every on-disk format and its file names (anchor dir, expert package + manifest,
merged dir, signatures, revocations, provenance) and the atomic, bounded file I/O they share."""
