"""Operations: the metrics, the health state, the HTTP server that answers for both, GPU statistics and
logging."""
