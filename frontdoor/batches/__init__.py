"""Files and batches of the HTTP APIs (OpenAI Files and Batches, Anthropic Message Batches),
run through the gateway's batch pipeline (``producer.batch``).

| module         | holds                                                                  |
|----------------|------------------------------------------------------------------------|
| files          | files in PostgreSQL, in parts: uploads, batch inputs and results       |
| records        | the batches' rows: what callers see, and leases for the runners        |
| runner         | ``BatchRunner``: takes batches left to run and drives each to its end  |
| gateway_record | the gateway's record of a batch, read in Redis once its key is revoked |
| results        | ``StoredResults``: collect's sink over a batch's stored result files   |
| objects        | the API objects (file, batch, message_batch) and list pages            |
| upload         | reading large request bodies within a size and a time limit            |

The routes are ``frontdoor/routes/files.py``, ``batches.py`` and ``message_batches.py``.
"""

from frontdoor.batches.runner import BatchRunner

__all__ = ["BatchRunner"]
