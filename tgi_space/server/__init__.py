"""The TGI shard server: gRPC v3 service, batch contract and error interceptor.

Protocol stubs are generated on first use by `tgi_space.server.protogen.load_pb()`.
"""
