"""The serving benchmark's parts, run by bench/run.py: ``inputs`` (the models and the requests
each server is sent), ``servers`` (the servers under test, how each is started and stopped),
``load`` (wrk, CPU time from /proc, raw onnxruntime), ``matrix`` (the runs: every server,
request and client count, then the paired ratios) and ``report`` (medians, ratios, the bound,
the figures and the table)."""
