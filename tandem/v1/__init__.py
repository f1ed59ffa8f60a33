"""tandem.v1: generation_pb2 (the client API) and worker_pb2 (workers, registry, cluster status). Generated; do not edit."""
