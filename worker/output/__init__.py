"""Output: what is sent for each record, how it is sent and committed (the delivery guarantees),
offsets and the topics' size limits."""
