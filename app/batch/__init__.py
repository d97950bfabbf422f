"""Batch jobs: the OpenAI Files and Batch APIs over the pool.

``input`` reads a JSONL input file into requests (and refused lines); ``lines`` writes the output
and error files' lines; ``objects`` renders files and batches as OpenAI objects; ``service`` is
what the API (and a command line) call; ``stages`` opens a batch (its items) and closes it (its
files); ``commit`` stores results durably; ``runner`` drains batches through the dispatcher,
inside the server.
"""
