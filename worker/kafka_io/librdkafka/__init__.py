"""librdkafka (confluent-kafka) behind the Kafka layer's Protocols: ``--kafka-client librdkafka``.

- :mod:`.options`: the worker's settings as librdkafka properties (one set of flags for both clients);
- :mod:`.errors`: librdkafka's errors (fatal, abortable, retriable) as the layer's error types;
- :mod:`.consumer` and :mod:`.producer`: the adapters; rebalance callbacks and delivery reports arrive as
  the worker expects them whatever thread librdkafka serves them on;
- :mod:`.factories`: clients from the settings, with kafka-python's start-up retries and topic calls.

Nothing here patches the client: its partitioner is named (``murmur2_random``, the Java client's).
"""
