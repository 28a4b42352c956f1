"""Catalogs in: product catalogs (CSV / JSONL / Parquet files and folders, image folders), the
synthetic demo catalog, and pairs files for evaluation. Above ``models`` only."""
