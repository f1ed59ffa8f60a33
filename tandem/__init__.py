"""Generated gRPC stubs of the tandem API (from proto/tandem/v1/*.proto by grpcio-tools; `make proto`)."""
