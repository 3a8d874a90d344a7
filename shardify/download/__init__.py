"""The URL downloader of `shardify pairs` URL lists: fetcher.py fetches one URL within limits,
order.py runs downloads ahead of a slow one and hands results back in order, retry.py writes
the download summary and decides what --retry-failed fetches again."""
