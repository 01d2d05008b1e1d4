"""Generated protobuf and gRPC code for hivewire (from proto/). Do not edit."""
