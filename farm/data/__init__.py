"""Data: sessions (Parquet), the V4 release import, images and image banks, the simulated population."""
