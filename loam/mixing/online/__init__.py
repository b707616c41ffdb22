"""Online mixing controllers: weight sources that read the training losses.

One module per method, chosen by ``config.mixing.method = "<module>"``; each exports
``make_source(config, domains) -> loam.data.weights.WeightSource`` with ``adaptive = True``
(see ``loam.data.weights.source_from_config`` and ``FEEDBACK_DELAY``).
"""
