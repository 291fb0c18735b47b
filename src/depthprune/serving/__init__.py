"""Cloud-edge split inference (CE-CoLLM, ICWS'25): `split` (the two halves on the core), `transfer` (binary tensor
frames), `context` (the cloud context manager), `server` (the FastAPI service), `edge` (the edge client)."""
