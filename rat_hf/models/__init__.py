"""Model folders, one per architecture, each importing only torch, transformers and its own configuration."""
