//! http and gRPC upstreams (owned by the http data-plane work).
