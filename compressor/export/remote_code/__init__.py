"""Modeling files shipped next to exports that stock transformers cannot express (named by ``auto_map``).

Each file is self-contained (torch and transformers only) because it is copied into the output directory and
imported there by ``from_pretrained(..., trust_remote_code=True)``; compressor imports them too, so the
in-memory model and the reloaded one are built by the same classes.
"""
