"""Images by reference: ``http(s)://``, ``s3://`` and ``file://`` URIs fetched safely (SSRF guard, byte
and time limits, bounded retries) into the bytes an inline image would have carried.

:class:`worker.fetching.fetcher.Fetcher` is the entry point; :mod:`worker.fetching.uri` parses and
redacts references.
"""
