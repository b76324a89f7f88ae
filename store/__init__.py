"""Everything that touches Redis or disk: keys, scripts, the case queue, the archive."""
