"""Who may call what: identities, credentials, capabilities and the policy.

- :mod:`.identity`: :class:`Identity` (who the caller is) and :class:`Need`
  (what a method requires), with :func:`require`.
- :mod:`.secret`: the cluster secret (the root of trust every server holds)
  and the keys derived from it: one per node, one for capabilities.
- :mod:`.tokens`: users' tokens (random, 256 bits; stored only as a hash).
- :mod:`.capability`: the short-lived grants meta signs and storage checks.
- :mod:`.policy`: the one table of what every RPC and frame type needs;
  anything not in it is refused (fail closed).
- :mod:`.grpc_auth`: credentials in gRPC metadata and the server interceptor.
"""
