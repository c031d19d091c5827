"""Header names on the wire."""

ERROR = "Nats-Service-Error"
ERROR_CODE = "Nats-Service-Error-Code"
MSG_ID = "Nats-Msg-Id"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# The trace id of the request's trace, returned on every reply so a user can find it.
TRACE_ID = "Vnet-Trace-Id"
# Which service instance answered (useful with N replicas in a queue group).
INSTANCE = "Vnet-Instance"
# On the answer to a create that waited, when the endpoint's node sent it itself (it is ready):
# that node's id (docs/endpoints.md, "Who answers a create").
NODE = "Vnet-Node"
# The caller's deadline, Unix time in milliseconds: set by the client from its timeout and
# carried on to every call a service makes for the request. A service does not start work
# (above all a mutation) whose deadline has passed: nobody waits for the answer any more.
DEADLINE = "Vnet-Deadline"
