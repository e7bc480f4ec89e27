"""Files: atomic writes (temp file + rename), files by URL (a local path or any fsspec protocol), content
hashes."""
