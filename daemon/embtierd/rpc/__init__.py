"""The gRPC front: the daemon process (server), the servicer, one interceptor
per cross-cutting concern, metrics, TLS and trace recording."""
