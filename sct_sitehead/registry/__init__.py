"""Release registry: specs, signed indexes, trust, the asset cache, downloads, mirrors, publishing."""
