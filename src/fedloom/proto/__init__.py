"""fedloom's gRPC protocol: `fedloom.proto` and the modules generated from it."""
