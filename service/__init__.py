"""cortexlens online system: Ray Serve application, gRPC servicers, ingestion, registry, CLI."""
