"""The only door between the worker and the coordinator: the wire codec (wire.py, format.py,
msgpack_reader.py), every message's schema (messages.py, from which the browser's codec table is
generated), the weight-blob format (blobs.py), the model types both sides share (model_types.py)
and the error types (errors.py, and format.ProtocolError for a peer's bad bytes)."""
