"""Input kinds: how each kind of request (see :class:`worker.messages.InputKind`) becomes model-ready work.

One module per kind, each an :class:`~worker.intake.inputs.base.InputHandler`; the intake stage dispatches
to them by kind and keeps the records in order. A kind with no handler on this worker is refused with
``input_kind_disabled``.
"""
