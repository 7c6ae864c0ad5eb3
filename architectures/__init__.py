"""Architecture definitions: data only, one JSON file per architecture (read by common.arch)."""
