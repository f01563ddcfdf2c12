"""Serving and exporting trained checkpoints: ``bp-apps serve`` (one HTTP server for any task's checkpoint) and
``bp-apps export`` (ONNX, ``torch.export`` or Hugging Face form, with a parity check). The optional packages
(FastAPI and uvicorn, ONNX Runtime) are imported only by the command that needs them."""
