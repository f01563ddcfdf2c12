"""The training layer every task stands on: the shared TaskModule and classifier module, callbacks, exact resume,
samplers, DDP for the engine, safe file I/O, and what data modules share with their models (``datalink``)."""
