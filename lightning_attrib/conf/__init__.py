"""Hydra configs shipped with the package (pkg://lightning_attrib.conf); `configs/` in the repo points here."""
